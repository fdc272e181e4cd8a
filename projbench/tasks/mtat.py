"""`task=mtat`: music auto-tagging on MagnaTagATune with a Harmonic CNN: the music tagging
columns (ROC-AUC, PR-AUC) of the paper's Table 5.

Data: the official layout under `task.data.root` (projbench/data/mtat.py says which files and
how the split and the 50 tags are chosen). Clips are 29.1 s, 16 kHz mono mp3s read with
soundfile. Training takes a random `crop_seconds` crop of each clip; evaluation cuts each clip
into `eval_chunks` crops of that length spread over the whole clip and averages their sigmoid
outputs, as the Harmonic CNN authors' evaluation does (16 crops of 5 s). `task.data.fixture=true`
writes a tiny data set in the same layout (rank 0, once, under `task.data.fixture_root`) and
reads it through the same reader.

Model, loss, training and metrics: projbench/tasks/tagging.py (TaggingTask), one output per tag.
Metrics (x 100, reduced over DDP ranks by torchmetrics):
  roc_auc  ROC-AUC, macro over the tags (those with positive and negative clips in the split:
           all 50 on MagnaTagATune); the primary metric
  pr_auc   average precision, macro over the same tags
  loss     binary cross-entropy per clip (mean over tags and crops)
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from torch.utils.data import Dataset

from projbench.data.mtat import read_mtat, write_mtat_fixture
from projbench.errors import ConfigError
from projbench.tasks.tagging import TaggingTask


class MtatTask(TaggingTask):
    positive_keys = (*TaggingTask.positive_keys, "eval_chunks", "num_tags")

    def check_config(self) -> None:
        data = self.cfg.data
        if data.tags is not None and data.split_dir is not None:
            raise ConfigError("task.data.tags", "leave it null with task.data.split_dir (the split's tags.npy decides)")
        if data.tags is not None and len(set(data.tags)) != len(data.tags):
            raise ConfigError("task.data.tags", f"lists a tag twice: {list(data.tags)}")

    def write_fixture(self, root: Path) -> None:
        write_mtat_fixture(root)

    def read_splits(self, root: Path) -> None:
        data = self.cfg.data
        tags = OmegaConf.to_container(data.tags) if data.tags is not None else None
        split_dir = None if data.split_dir is None else Path(data.split_dir)
        self.classes, self.splits = read_mtat(root, tags, int(data.num_tags), split_dir, data.audio_dir)

    def eval_datasets(self) -> dict[str, Dataset]:
        return self.chunked_eval_datasets()
