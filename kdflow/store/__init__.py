"""Where outputs live: the stage contract (content keys, atomic outputs, manifests), run folders on local or remote
storage, data files."""
