"""Every kind of file qtrain reads, damaged by hypothesis: the originals, the cases, the verdict.

Each kind builds its original files once (`Originals`, fuzz_originals.py, in a folder of its
own), draws cases (`cases()`: a hypothesis strategy of fuzz_mutations.py's edits), and judges
one case in a fresh folder (`check()` returns a `fuzz_harness.Verdict`). The kinds live in
fuzz_kinds_models.py (packed files, checkpoints), fuzz_kinds_config.py (config files, presets,
metrics.jsonl) and fuzz_kinds_data.py (CIFAR, text, ImageNet).

What "the same result" means, per kind:

packed       `qtrain eval FILE --json` of a packed export. Every byte is covered by a CRC-32
             (the tensors' and the qtrain header's) or decides how they are found, so the
             only results allowed are the unmutated file's JSON, field for field, or a refusal.
             Cases: byte edits (anywhere, or in the safetensors JSON header), and edits of the
             header's structure (a tensor's dtype, shape or offsets; a qtrain header value)
             written back without recomputing any checksum.
checkpoint   `qtrain eval checkpoint.pt --json`, or `qtrain train --resume` of the run
             extended by one epoch (its metrics, all but the timings). Byte edits anywhere or
             near the zip archive's headers; each member carries a CRC-32, so again: the
             unmutated result or a refusal.
config       `qtrain train --config FILE` of a tiny run (tiny_mlp on synthetic images; the
             command line pins max_steps=2, one thread, no compile, no download, so that a
             mutated value cannot make a case long or reach the network). A changed value is
             allowed to change the run, so accepted means: the run folder's config.toml reads
             back exactly the mutated file's values (each key: the file's value, the
             command line's where it sets one, the default where the file has none) and the
             run finishes. Cases: value, type, key edits (the TOML stays valid) and byte edits.
presets      each shipped preset (qtrain/configs/*.toml), mutated the same way and read with
             `load_toml` + `from_dict` (a preset trains a full-size model, too long for a case):
             refused, or every key reads back exactly.
metrics      `qtrain report RUN` on a run folder whose metrics.jsonl is mutated. A record
             that is well formed (a JSON object on one line with an integer epoch, numbers for
             train_error and seconds, a number or null for test_error; the last record's
             test_error a number) is reported as read: table.json must hold exactly the last
             record's epoch and errors and the sum of the seconds, as parsed independently
             here; anything else must be refused (and a well-formed file must not be).
cifar        a fake CIFAR-10 folder (20 images per file) with one file mutated (bytes, or
             the unpickled dict edited and pickled again), read by `qtrain.data.load` and
             now and then trained on by `qtrain train`. The pickles carry no checksum, so a
             changed pixel or label is data: accepted means the images, labels and class
             names equal what an independent restricted unpickler reads from the file, and
             the file has the official structure (uint8 [N, 3072], N labels in 0..9, 10
             names); everything else must be refused.
text         a UTF-8 text (ASCII and 2-, 3- and 4-byte characters), bytes mutated, read as
             `text_file` by `qtrain.data.load` and now and then trained on by `qtrain train`
             (a tiny GPT). Accepted means: the token ids decode to exactly the file's text,
             and the run recorded the SHA-256 of exactly that text; empty, NUL-holding and
             invalid UTF-8 files must be refused.
imagenet     a tiny ImageNet folder (two classes, JPEG and PNG files), with image bytes
             mutated or the layout changed (files renamed, deleted, moved, junk added,
             class folders renamed or added). Accepted means: the samples and labels equal an
             independent scan of the folders, and every image's evaluation pixels equal what
             Pillow decodes from its file (then resized and centre-cropped); an image Pillow
             cannot decode must be refused. Now and then the case also trains on the folder
             with `qtrain train` (DataLoader worker processes on).

Two more kinds edit a file the way a tool or a person would, keeping it valid:
packed-resigned     the qtrain header of a packed file edited (values, types, keys) and its
                    CRC-32 recomputed; `qtrain eval FILE --json`.
checkpoint-resaved  entries of a checkpoint edited (values, tensors of another shape or
                    dtype, keys) and the dict saved again with torch.save, so every CRC-32
                    is valid; `qtrain eval checkpoint.pt --json`.
Such a file is another valid file, not a damaged one: it may be accepted with another
result ("read"); it must still never end in a traceback or a hang.
"""

from __future__ import annotations

import shutil

from fuzz_harness import Verdict
from fuzz_kinds_config import ConfigKind, MetricsKind, PresetKind
from fuzz_kinds_data import CifarKind, ImageNetKind, TextKind
from fuzz_kinds_models import CheckpointEditKind, CheckpointKind, PackedEditKind, PackedKind
from fuzz_originals import Originals, imagenet_images

__all__ = ["KINDS", "Originals", "imagenet_images", "run_case"]

KINDS = (
    PackedKind,
    CheckpointKind,
    ConfigKind,
    PresetKind,
    MetricsKind,
    CifarKind,
    TextKind,
    ImageNetKind,
    PackedEditKind,
    CheckpointEditKind,
)


def run_case(kind, case) -> Verdict:
    """Judge one case in a fresh folder, removed afterwards."""
    folder = kind.originals.case_folder()
    try:
        return kind.check(case, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
