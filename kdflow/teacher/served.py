"""Which model an OpenAI-compatible server serves under a name: what ``GET {base_url}/models`` says of it.

An API teacher or judge has no weights here to hash, and its name and URL do not say which model answers: a server
restarted on new weights, or a provider that moves a name to a new snapshot, serves another model under the same
name at the same URL. So the stages that ask one (the teacher's answers, the API teacher's own evaluation, the LLM
judge) put the model's card into their keys: its ``id``, ``created`` and ``owned_by``, and where the server reports
them vLLM's (and SGLang's, lmdeploy's) ``root`` — the weights it loaded — ``parent`` and ``max_model_len``. Those
servers stamp ``created`` with the time of the request, not of the model, so it is left out wherever a card has a
``root``: else every run would have a new key and ask for every answer again.

The card is read once per process (per base URL and model): every key computed in a run sees the same one.

When the server cannot say (no network, a timeout, a 5xx, an endpoint without ``/models``, a key that may not list
models, a name it does not list), the stage is keyed by what the server said the last time it was asked on this
machine (``state_dir()/served-models.json``), with a warning; by the name and URL alone when it was never
asked. Failing instead would stop a rerun of a finished run on a machine off the network
(a report, a new student) though it would ask nothing; and keying by name and URL at once would give a finished run a
new key and ask for every paid answer again. A server that is really down fails the stage at its first request anyway.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import httpx

from kdflow.config.fields import redact_url
from kdflow.store.model_folders import state_dir
from kdflow.store.outputs import write_atomic
from kdflow.teacher.api_client import FatalApiError

CARD_FIELDS = ("id", "created", "owned_by", "root", "parent", "max_model_len")
RECORDS = "served-models.json"
TIMEOUT_S, TRIES, BACKOFF_S = 10.0, 3, 0.5
log = logging.getLogger(__name__)

_seen: dict[tuple[str, str], dict | None] = {}  # this process's answer per (base URL without password, model)
_lock = threading.Lock()


class ServedUnknown(Exception):
    """The server did not say which model it serves under the name (why, without the key or a password)."""


def card_identity(card: dict) -> dict:
    """What of a ``/models`` card says which model it is (see the module's docstring for ``created``)."""
    kept = {k: card[k] for k in CARD_FIELDS if card.get(k) is not None}
    if "root" in kept:
        kept.pop("created", None)
    return kept


def ask(base_url: str, model: str, api_key: str | None) -> dict:
    """The card the server lists for ``model``, as ``card_identity`` keeps it; ``ServedUnknown`` if it says none."""
    url = base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    why = ""
    for attempt in range(TRIES):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            reply = httpx.get(url, headers=headers, timeout=TIMEOUT_S, follow_redirects=True)
        except httpx.HTTPError as e:  # no connection, a timeout: perhaps a blip, try again
            why = f"{type(e).__name__} asking {redact_url(url)}"
            continue
        if reply.status_code == 429 or reply.status_code >= 500:
            why = f"HTTP {reply.status_code} from {redact_url(url)}"
            continue
        if reply.status_code >= 400:  # no such endpoint, a key that may not list models: asking again will not help
            raise ServedUnknown(f"HTTP {reply.status_code} from {redact_url(url)}")
        try:
            cards = [c for c in reply.json()["data"] if isinstance(c, dict)]
        except (ValueError, KeyError, TypeError):
            raise ServedUnknown(f"{redact_url(url)} answered no model list") from None
        for card in cards:
            if card.get("id") == model:
                return card_identity(card)
        raise ServedUnknown(f"{redact_url(url)} lists no model {model!r} (it lists {len(cards)})")
    raise ServedUnknown(why)


def served_identity(base_url: str | None, model: str, api_key: Callable[[], str | None] = lambda: None) -> dict | None:
    """The served model's card for a stage's key (asked once per process), else the one last recorded on this machine,
    else None (keyed by name and URL). ``api_key`` reads the key (the endpoint may need one to list models)."""
    who = (redact_url(base_url) or "", model)
    with _lock:
        if who in _seen:
            return _seen[who]
    try:
        try:
            key = api_key()
        except (FatalApiError, ValueError):  # the key is unset or its Secret block missing: ask without one
            key = None
        identity = ask(base_url or "https://api.openai.com/v1", model, key)
        _record(who, identity)
    except ServedUnknown as e:
        last = _records().get(" ".join(who))
        last = last if isinstance(last, dict) and isinstance(last.get("identity"), dict) else None
        identity = last["identity"] if last else None
        log.warning(
            f"could not learn which model {who[0]} serves as {model!r} ({e}); "
            + (
                f"keyed by what it said on {last['seen']}: {identity}"
                if last
                else "keyed by its name and URL alone: "
                "a different model served under this name there would not be told apart"
            )
        )
    with _lock:
        return _seen.setdefault(who, identity)


def forget() -> None:
    """Ask again next time (a new run in the same process; tests)."""
    with _lock:
        _seen.clear()


def _records() -> dict:
    try:
        records = json.loads((state_dir() / RECORDS).read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def _record(who: tuple[str, str], identity: dict) -> None:
    records = _records()
    records[" ".join(who)] = {"identity": identity, "seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        state_dir().mkdir(parents=True, exist_ok=True)
        write_atomic(state_dir() / RECORDS, json.dumps(records, indent=1))
    except OSError as e:
        log.warning(f"could not record what {who[0]} serves in {state_dir() / RECORDS} ({e})")
