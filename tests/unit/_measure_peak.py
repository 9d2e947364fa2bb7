"""Run by tests/unit/test_admission.py in a fresh process: train one trial (its config as JSON in
argv[1]) after a warm-up, as a worker's training process does, and print the peak resident memory
it added, in bytes (Linux: VmHWM after clear_refs, less VmRSS before)."""

import json
import sys

from services.trial_config import TrialConfig
from worker.training.memory import keep_freed_memory


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    keep_freed_memory()  # as worker/celery_app.py does before torch allocates
    import torch

    from worker.training import train_trial

    torch.set_num_threads(1)
    train_trial(TrialConfig(n_train=16, n_val=8, n_test=4, width=4, depth=1, epochs=1, batch_size=8))
    config = TrialConfig.model_validate(json.loads(sys.argv[1]))
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak starts again from now
    train_trial(config)
    print(json.dumps({"peak_bytes": _status("VmHWM") - before}))


if __name__ == "__main__":
    main()
