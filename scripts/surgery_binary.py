"""The `surgery` binary as the Python checks call it (scripts/check_transformers.py,
scripts/check_peer_interop.py): run in a work folder, its stdout returned, a failure ending the
check with its stderr."""

import subprocess
import sys


class Surgery:
    """The binary, run in the work folder."""

    def __init__(self, binary, work):
        self.binary, self.work = binary, work

    def __call__(self, *args):
        done = subprocess.run(
            [str(self.binary), *map(str, args)], cwd=self.work, capture_output=True, text=True
        )
        if done.returncode != 0:
            sys.exit(f"surgery {' '.join(map(str, args))} failed:\n{done.stderr}")
        return done.stdout
