"""`task=dcase`: DCASE 2017 Task 4 sound event tagging (subtask A, audio tagging) with a Harmonic
CNN: the DCASE column of the paper's Table 5.

Data: the official layout under `task.data.root` (projbench/data/audio.py says which files):
the weak-label training set trains, the testing set is the "val" split and the evaluation set
the "test" split. Clips are read with soundfile, averaged to mono, resampled to
`task.data.sample_rate`; training takes a random `crop_seconds` crop of each clip; evaluation
averages the model's sigmoid outputs over `eval_chunks` crops of `crop_seconds` spread over the
clip (16 by default, as the Harmonic CNN code's eval.py), or with `eval_chunks: null` sees a
centred `eval_seconds` crop in one pass; a clip shorter than a crop is zero-padded.
`task.data.fixture=true` writes a tiny data set in the same layout (rank 0, once, under
`task.data.fixture_root`) and reads it through the same reader.

Model, loss, training and the AUC metrics: projbench/tasks/tagging.py (TaggingTask), 17 outputs.
Metrics (x 100, reduced over DDP ranks by torchmetrics):
  f1       F1 of the tags with a sigmoid output above `task.f1.threshold`, the primary metric:
           `average: samples` (the recipe's) is each clip's F1 averaged over clips, as the
           Harmonic CNN code scores DCASE (scikit-learn's f1_score(average='samples') at 0.1; a
           clip with no true and no predicted tag scores 0, as there); `average: micro` is the
           instance-level F1 over clips x classes by which DCASE 2017 Task 4 subtask A ranks
           systems (sed_eval's tagging F-score, threshold 0.5)
  roc_auc  ROC-AUC, macro over the classes that have positive and negative clips in the split
  pr_auc   average precision, macro over the same classes
  loss     binary cross-entropy per clip (mean over classes)
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
import torch
from torch.utils.data import Dataset
from torchmetrics import Metric
from torchmetrics.classification import MultilabelF1Score

from projbench.data.audio import DCASE2017_CLASSES, ClipDataset, read_dcase, write_dcase_fixture
from projbench.errors import ConfigError
from projbench.tasks.tagging import TaggingTask


F1_AVERAGES = ("samples", "micro")


class SamplesF1(Metric):
    """Multilabel F1 per sample (clip), averaged over samples: 2 TP / (2 TP + FP + FN) of each
    row, 0 for a row with no true and no predicted label (scikit-learn's
    `f1_score(average="samples")` with its default `zero_division`). `update` takes probabilities
    (TaggingTask passes each clip's mean sigmoid output); a tag is predicted when its probability
    is above `threshold` (strictly, as `est > 0.1` in the Harmonic CNN code)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        predicted = preds > self.threshold
        truth = target.bool()
        tp = (predicted & truth).sum(dim=1, dtype=torch.float64)
        wrong = (predicted ^ truth).sum(dim=1, dtype=torch.float64)  # FP + FN
        denominator = 2 * tp + wrong
        self.total += torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), 0.0).sum()
        self.count += preds.shape[0]

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class DcaseTask(TaggingTask):
    metrics = {"f1": "max", **TaggingTask.metrics}
    classes = DCASE2017_CLASSES
    positive_keys = (*TaggingTask.positive_keys, "eval_seconds", "eval_chunks")
    nullable_keys = ("eval_chunks",)

    def check_config(self) -> None:
        if not 0 < self.cfg.f1.threshold < 1:
            raise ConfigError("task.f1.threshold", f"must be between 0 and 1, got {self.cfg.f1.threshold}")
        if self.cfg.f1.average not in F1_AVERAGES:
            raise ConfigError("task.f1.average", f"must be one of {', '.join(F1_AVERAGES)}, got {self.cfg.f1.average!r}")

    def write_fixture(self, root: Path) -> None:
        write_dcase_fixture(root)

    def read_splits(self, root: Path) -> None:
        data = self.cfg.data
        self.splits = read_dcase(root, OmegaConf.to_container(data.label_files),
                                 OmegaConf.to_container(data.audio_dirs), self.classes)

    def eval_datasets(self) -> dict[str, Dataset]:
        data = self.cfg.data
        if data.eval_chunks is not None:
            return self.chunked_eval_datasets()
        return {split: ClipDataset(self.splits[split], self.num_classes, int(data.sample_rate),  # one pass
                                   float(data.eval_seconds), random_crop=False) for split in ("val", "test")}

    def extra_metrics(self) -> dict[str, Metric]:
        threshold = float(self.cfg.f1.threshold)
        if self.cfg.f1.average == "samples":
            return {"f1": SamplesF1(threshold)}
        return {"f1": MultilabelF1Score(self.num_classes, threshold=threshold, average="micro")}
