"""Prefect's cached stage results are JSON, and a pickle planted in result storage is never loaded (issue 12,
item 7): result storage on a shared mount must not run code on whoever reads it."""

import json
import pickle
from pathlib import Path

from kdflow.config.recipe import load_recipe


class Planted:
    """Unpickling this writes a file: the proof that a pickle was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("unpickled",))


def storage_path() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().results.local_storage_path).expanduser()


def test_stage_results_are_json_and_a_planted_pickle_is_never_loaded(prefect_server, mini_recipe, tmp_path):
    from prefect import flow

    from tasks.data import DATA, make_data

    r = load_recipe(mini_recipe)

    @flow
    def data_only():
        return make_data(r.run_dir, r.data)

    first = data_only()
    key = DATA.key(run_dir=r.run_dir, section=r.data)
    record = json.loads((storage_path() / key).read_bytes())
    assert record["metadata"]["serializer"]["type"] == "json"
    assert json.loads(record["result"])["data"]["sha256"] == first.sha256  # plain data, readable by anyone

    # Someone with write access to the shared result storage replaces the record with a pickle.
    marker = tmp_path / "pwned"
    planted = {
        "metadata": {
            "serializer": {"type": "pickle", "picklelib": "cloudpickle"},
            "storage_key": key,
            "expiration": None,
            "storage_block_id": None,
        },
        "result": __import__("base64").b64encode(pickle.dumps(Planted(str(marker)))).decode(),
    }
    (storage_path() / key).write_text(json.dumps(planted))
    again = data_only()
    assert not marker.exists(), "a pickle in result storage was loaded"
    assert again.sha256 == first.sha256 and again.is_complete()  # recomputed (same content), then trusted
    assert json.loads((storage_path() / key).read_bytes())["metadata"]["serializer"]["type"] == "json"


PLANTED_MODULE = "kdflow_planted_module_7c1e"


def test_a_record_naming_a_module_anywhere_is_never_decoded(prefect_server, mini_recipe, tmp_path, monkeypatch):
    """Issue 23, finding 9: Prefect's JSON decoder imports the module any nested ``__class__`` names (and the
    record's own serializer names its jsonlib and object_decoder). A planted module that writes a file when imported
    proves it was not; each record is dropped and the stage recomputed."""
    import sys

    from prefect import flow

    from tasks.data import DATA, make_data

    marker = tmp_path / "imported"
    (tmp_path / f"{PLANTED_MODULE}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\n"
        "class X:\n    pass\ndef decode(d):\n    return d\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    r = load_recipe(mini_recipe)

    @flow
    def data_only():
        return make_data(r.run_dir, r.data)

    first = data_only()
    key = DATA.key(run_dir=r.run_dir, section=r.data)
    good = json.loads((storage_path() / key).read_bytes())
    result = json.loads(good["result"])
    nested = {
        **good,
        "result": json.dumps(
            {**result, "data": {**result["data"], "x": {"__class__": f"{PLANTED_MODULE}.X", "data": {}}}}
        ),
    }
    decoder = {
        **good,
        "metadata": {
            **good["metadata"],
            "serializer": {**good["metadata"]["serializer"], "object_decoder": f"{PLANTED_MODULE}.decode"},
        },
    }
    for planted in (nested, decoder):
        (storage_path() / key).write_text(json.dumps(planted))
        again = data_only()
        assert not marker.exists() and PLANTED_MODULE not in sys.modules, "a module named in a record was imported"
        assert again.sha256 == first.sha256 and again.is_complete()
        assert json.loads((storage_path() / key).read_bytes())["result"] == good["result"]  # recomputed, rewritten
