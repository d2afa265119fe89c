"""Execute every notebook in place with its GPU cells live (nbclient), on the GPU machine.

Used by `bash tools/device.sh notebooks`: the executed notebooks come back and are committed, so the
GPU cells show a real run (GPU name and date in their output). Prints one line per notebook.
"""
import glob
import sys
import time

import nbclient
import nbformat

failed = 0
for path in sorted(glob.glob("notebooks/0*.ipynb")):
    t = time.time()
    nb = nbformat.read(path, as_version=4)
    try:
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": "notebooks"}}).execute()
    except Exception as e:  # report and go on: the others still run
        failed += 1
        print(f"{path}: FAILED {type(e).__name__}: {str(e).splitlines()[-1][:200] if str(e) else ''}")
        continue
    nbformat.write(nb, path)
    print(f"{path}: executed in {time.time() - t:.0f} s")
sys.exit(1 if failed else 0)
