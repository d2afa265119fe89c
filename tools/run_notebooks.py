"""Execute notebooks in place (nbclient): ``python tools/run_notebooks.py [notebooks/NN_x.ipynb ...]``, default all.

On the GPU machine (`bash tools/device.sh notebooks`) the GPU cells run live and the executed notebooks come
back to be committed (GPU name and date in their output); on a CPU machine the same refreshes the committed
outputs after a change (the GPU cells then show the recorded runs). Prints one line per notebook.
"""
import glob
import sys
import time

import nbclient
import nbformat

failed = 0
for path in sys.argv[1:] or sorted(glob.glob("notebooks/[0-9][0-9]_*.ipynb")):
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
