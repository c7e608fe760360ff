"""Synthetic long-range tasks: do context states carry information past the attention window?

`generators` samples the tasks (copying memory, multi-query associative recall, selective copying,
induction heads at a distance, passkey retrieval), each with a reference solver; `runner` trains
presets on them for a fixed number of optimizer steps and scores accuracy by distance; `report`
tabulates and plots (for passkey, a depth x length grid and its heat map).
"""

from .generators import TASKS, Task, TaskBatch, make_task, register_task, score
from .report import summarize, write_report
from .runner import Run, Settings, run_all, train_run

__all__ = ["TASKS", "Run", "Settings", "Task", "TaskBatch", "make_task", "register_task", "run_all",
           "score", "summarize", "train_run", "write_report"]
