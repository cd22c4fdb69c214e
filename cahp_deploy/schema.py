"""Schema versions of the files that flow between stages, and the one check readers share."""

from __future__ import annotations

from cahp_deploy.errors import CahpError

SELECTION = "cahp-deploy/selection/2"  # 2: FFN neurons (kept_neurons, ffn); 1 is still read
SELECTION_READABLE = ("cahp-deploy/selection/1", SELECTION)
PRUNING = "cahp-deploy/pruning/1"
MANIFEST = "cahp-deploy/manifest/1"
REPORT = "cahp-deploy/report/1"
STUDY = "cahp-deploy/study/1"
RUN = "cahp-deploy/run/1"
RECOVERY = "cahp-deploy/recovery/1"


def check_schema(obj: dict, expected: str | tuple[str, ...], source: str) -> None:
    """Fail clearly on a file of another kind or of a version this code does not know.

    ``expected`` is one schema or a tuple of the versions a reader accepts.
    """
    found = obj.get("schema") if isinstance(obj, dict) else None
    accepted = (expected,) if isinstance(expected, str) else tuple(expected)
    if found not in accepted:
        raise CahpError(f"{source}: expected schema {' or '.join(map(repr, accepted))}, found {found!r}")
