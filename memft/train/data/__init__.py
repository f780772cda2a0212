"""A run's data: sources -> checked rows -> tokenised examples -> mixed, packed splits -> batches.

- `sources`: where rows come from (bundled sets, files, folders, globs, `save_to_disk` folders,
  `datasets.load_dataset`); `checks`: refusing bad rows with the file and line.
- `encoding`: formats (text, alpaca, chat) to input_ids and labels, truncation, the chat template.
- `mixing`: several sources by weight (data.mix); `packing`: several examples per row (data.packing).
- `splits`: `build_splits`, the training and evaluation examples; `batches`: collation, what of a batch
  the model gets (`model_inputs`), the batch order and the run length from train.num_epochs.

Bad data is refused with a DataError naming the recipe key, the file, the line (or row index) and what is
wrong; rows dropped or truncated by tokenisation, the mixture and the packing are described in `Splits.notes`.
"""

from memft.train.data.batches import BatchOrder, collate, model_inputs, with_run_length
from memft.train.data.encoding import IGNORE_INDEX, alpaca_prompt, encode_row, tokenize_rows, with_chat_template
from memft.train.data.packing import pack
from memft.train.data.sources import load_rows, resolve_data_path
from memft.train.data.splits import HELD_OUT, Splits, build_splits

__all__ = ["HELD_OUT", "IGNORE_INDEX", "BatchOrder", "Splits", "alpaca_prompt", "build_splits", "collate",
           "encode_row", "load_rows", "model_inputs", "pack", "resolve_data_path", "tokenize_rows",
           "with_chat_template", "with_run_length"]
