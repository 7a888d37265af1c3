"""One linear ``run_*`` workflow per command."""
