"""One run of the tiny W2A2 config that may signal itself (train_test.py).

usage: python -m tests.interrupted_run TMPDIR WORKDIR TEACHER WORKERS [SIGNAL STEP]

Runs ``tiny_setup.tiny_config(TMPDIR, num_steps=12)`` with the teacher
checkpoint TEACHER and ``data.workers = WORKERS`` in WORKDIR. With SIGNAL
(``TERM`` or ``KILL``) the process sends it to itself right after step
STEP of GDNSQ (after that step's validation and checkpoint), as a
scheduler or ``kill -9`` would. Prints the results dict as JSON last.
"""

import json
import os
import signal
import sys


def main():
  tmpdir, workdir, teacher, workers = sys.argv[1:5]
  from train import loop  # pylint: disable=g-import-not-at-top
  from train import train_lib  # pylint: disable=g-import-not-at-top
  from tests import tiny_setup  # pylint: disable=g-import-not-at-top

  if len(sys.argv) > 5:
    signum = getattr(signal, "SIG" + sys.argv[5])
    at_step = int(sys.argv[6])
    after_step = loop._after_gdnsq_step  # pylint: disable=protected-access

    def signalling(run, step, loop_state):
      out = after_step(run, step, loop_state)
      if step == at_step:
        os.kill(os.getpid(), signum)
      return out

    loop._after_gdnsq_step = signalling  # pylint: disable=protected-access
  config = tiny_setup.tiny_config(tmpdir, num_steps=12)
  config.teacher.checkpoint = teacher
  config.data.workers = int(workers)
  results = train_lib.train_and_evaluate(config, workdir)
  print(json.dumps(results, default=str))


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  main()
