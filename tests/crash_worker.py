"""Run by test_resilience.py as a real process: ``pretrain.py`` with slow-downs that leave room to
kill it mid-step or mid-checkpoint. Environment: ``STEP_SLEEP`` seconds added to every micro-batch
after its backward, ``LOSS_SLEEP`` seconds inside its forward (where a signal may drop the step),
``SAVE_SLEEP`` seconds inside every checkpoint write (after the files, before the rename that
commits it), ``SAVE_MARK`` a file created when such a write begins. None changes what is computed.
``CRASH_AT_STEP`` with ``CRASH_RANK`` and ``CRASH_MARK``: that process dies (exit 3, no cleanup)
after that optimizer step, once: the mark file records that it did. ``EXPORT_FAIL``: the export
raises that message (a failure after training, with the loader still open)."""

import os
import sys
import time
from pathlib import Path

from mae import export, pretrain, runner
from mae.cli import main
from mae.config import Config, load_config
from mae.run import checkpoint

if __name__ == "__main__":
    step_sleep, save_sleep = (
        float(os.environ.get("STEP_SLEEP", 0)),
        float(os.environ.get("SAVE_SLEEP", 0)),
    )
    add, fsync = runner.MetricLog.add, checkpoint._fsync_tree
    loss, loss_sleep = pretrain.Pretraining.loss, float(os.environ.get("LOSS_SLEEP", 0))

    def slow_loss(self, *args):
        time.sleep(loss_sleep)
        return loss(self, *args)

    def slow_add(self, *args):
        time.sleep(step_sleep)
        add(self, *args)

    def slow_fsync(path):
        if os.environ.get("SAVE_MARK"):
            Path(os.environ["SAVE_MARK"]).write_text(str(path))
        time.sleep(save_sleep)
        fsync(path)

    after_step = runner.Runner._after_step
    crash_at, crash_rank = (
        int(os.environ.get("CRASH_AT_STEP", 0)),
        int(os.environ.get("CRASH_RANK", 0)),
    )

    def crashing_after_step(self, step, *args):
        done = after_step(self, step, *args)
        mark = Path(os.environ.get("CRASH_MARK", "crashed"))
        if step == crash_at and self.accelerator.process_index == crash_rank and not mark.exists():
            mark.write_text(str(step))
            os._exit(3)
        return done

    def failing_save(*args, **kwargs):
        raise RuntimeError(os.environ["EXPORT_FAIL"])

    if os.environ.get("EXPORT_FAIL"):
        export.save_timm = failing_save
    runner.MetricLog.add, checkpoint._fsync_tree = slow_add, slow_fsync
    pretrain.Pretraining.loss = slow_loss
    runner.Runner._after_step = crashing_after_step
    sys.exit(main("pretrain under test", Config, load_config, pretrain.train, sys.argv[1:]))
