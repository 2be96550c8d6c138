"""Helpers shared by the tests (not tests themselves): engine builders and references, a live
`softserve serve` process, a SeaweedFS S3 server."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
