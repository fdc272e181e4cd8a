"""`task=dcase`: DCASE 2017 Task 4 sound event tagging (subtask A, audio tagging) with a Harmonic
CNN: the DCASE column of the paper's Table 5.

Data: the official layout under `task.data.root` (projbench/data/audio.py says which files):
the weak-label training set trains, the testing set is the "val" split and the evaluation set
the "test" split. Clips are read with soundfile, averaged to mono, resampled to
`task.data.sample_rate`; training takes a random `crop_seconds` crop of each clip, evaluation a
centred `eval_seconds` crop (the whole 10 s clip by default), zero-padded when the clip is shorter.
`task.data.fixture=true` writes a tiny data set in the same layout (rank 0, once, under
`task.data.fixture_root`) and reads it through the same reader.

Model, loss, training and the AUC metrics: projbench/tasks/tagging.py (TaggingTask), 17 outputs.
Metrics (x 100, reduced over DDP ranks by torchmetrics):
  f1       instance-level micro F1 over clips x classes at `task.threshold`, as DCASE 2017
           Task 4 subtask A ranks systems (sed_eval's tagging F-score); the primary metric
  roc_auc  ROC-AUC, macro over the classes that have positive and negative clips in the split
  pr_auc   average precision, macro over the same classes
  loss     binary cross-entropy per clip (mean over classes)
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from torch.utils.data import Dataset
from torchmetrics import Metric
from torchmetrics.classification import MultilabelF1Score

from projbench.data.audio import DCASE2017_CLASSES, ClipDataset, read_dcase, write_dcase_fixture
from projbench.errors import ConfigError
from projbench.tasks.tagging import TaggingTask


class DcaseTask(TaggingTask):
    metrics = {"f1": "max", **TaggingTask.metrics}
    classes = DCASE2017_CLASSES
    positive_keys = (*TaggingTask.positive_keys, "eval_seconds")

    def check_config(self) -> None:
        if not 0 < self.cfg.threshold < 1:
            raise ConfigError("task.threshold", f"must be between 0 and 1, got {self.cfg.threshold}")

    def write_fixture(self, root: Path) -> None:
        write_dcase_fixture(root)

    def read_splits(self, root: Path) -> None:
        data = self.cfg.data
        self.splits = read_dcase(root, OmegaConf.to_container(data.label_files),
                                 OmegaConf.to_container(data.audio_dirs), self.classes)

    def eval_datasets(self) -> dict[str, Dataset]:
        data = self.cfg.data
        return {split: ClipDataset(self.splits[split], self.num_classes, int(data.sample_rate),
                                   float(data.eval_seconds), random_crop=False) for split in ("val", "test")}

    def extra_metrics(self) -> dict[str, Metric]:
        return {"f1": MultilabelF1Score(self.num_classes, threshold=float(self.cfg.threshold), average="micro")}
