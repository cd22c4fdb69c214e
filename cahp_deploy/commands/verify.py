"""``cahp-deploy verify``: re-check an artifact dir's hashes and run a parity smoke test."""

from __future__ import annotations

import click


@click.command("verify")
@click.argument("artifact_dir", type=click.Path())
@click.option("--no-smoke", "no_smoke", is_flag=True, help="Only check hashes; do not run the variants.")
def command(artifact_dir: str, no_smoke: bool) -> None:
    """Check that ARTIFACT_DIR is exactly what `cahp-deploy export` wrote and that every variant still
    matches the PyTorch logits recorded at export (or, for a `cahp-deploy handoff` dir, what handoff
    wrote and recorded). Exits 2 naming the first tampered or failing file."""
    from cahp_deploy.export.verify import is_handoff_dir, verify
    from cahp_deploy.handoff.verify import verify_handoff

    result = (verify_handoff if is_handoff_dir(artifact_dir) else verify)(artifact_dir, smoke=not no_smoke)
    smoke = result["smoke"]
    detail = "" if smoke is None else "; smoke: " + ", ".join(
        f"{v} max|diff| {r['max_abs_diff']:.1e}" for v, r in smoke.items()
    )
    click.echo(f"ok: {result['artifact']}: {result['files_checked']} files match {result.get('record', 'manifest.json')}{detail}")
