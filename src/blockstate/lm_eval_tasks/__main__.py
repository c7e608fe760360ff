"""`python -m blockstate.lm_eval_tasks [DIRECTORY]`: regenerate the bundled tasks' data files (into
this package's folder by default) from this interpreter's standard library."""

import sys

from . import TASKS_PATH, write_task_data

if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else TASKS_PATH
    print(write_task_data(directory), "->", directory)
