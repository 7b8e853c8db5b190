"""The ``curvkern`` console script: ``info``, ``score`` (saved checkpoints) and ``report`` (HTML).

::

    curvkern info
    curvkern score --model MODULE:FACTORY --checkpoints GLOB --data DATA --out PATH
                   [--n-probes N] [--h H] [--method M] [--batch-size B] [--device DEV]
    curvkern report PATH --data DATA --out REPORT.html [--top K]
    curvkern merge A.npz B.npz ... --out ALL.npz
    curvkern export PATH --out FILE.parquet|FILE.csv
    torchrun --nproc_per_node N -m curvkern score ...   (each process scores a share)

DATA is an .npz file with ``x`` (N, ...) and ``y`` (N,) (and optionally ``classes``, the class
names), an image folder laid out for torchvision's ImageFolder (one sub-folder per class), a
Hugging Face `datasets` folder or Parquet files (see curvkern.data.load_data).

A mistake the user can fix (a bad argument, a missing file, a factory that does not import, a
checkpoint that does not fit the model, data the model cannot take) ends with one line on stderr
and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import importlib.util
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from . import losses
from .checkpoints import epoch_in_name, load_checkpoint, load_error_line, restored_state
from .data import Data, DataError, TableDataset, fingerprint, load_data
from .data import one_line as _one_line
from .dataset import IndexedDataset
from .distributed import (
    RankFailed,
    check_ranks,
    fail_ranks,
    init_from_environment,
    is_distributed,
    is_main_process,
    launched_distributed,
)
from .estimators import METHODS
from .io import TrackerConflictError
from .report import build_report, format_ranges, load_scores
from .scorer import CurvatureScorer
from .tracker import CurvatureTracker

__all__ = ["main", "load_data", "Data", "CliError"]

USAGE_EXIT = 2


class CliError(Exception):
    """A mistake in the command's inputs: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (argparse prints the whole usage first)."""

    def error(self, message: str):
        raise CliError(f"{message} (see `{self.prog} --help`)")


# -- model and checkpoints ----------------------------------------------------------------------


def load_factory(spec: str) -> Callable[[], torch.nn.Module]:
    """MODULE:FACTORY -> the factory. MODULE is a module name (importable from the working
    directory or PYTHONPATH) or a path to a .py file."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"--model must be MODULE:FACTORY (e.g. mymodels:make_net), got {spec!r}")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                raise CliError(f"--model: file {module_name} does not exist")
            name = Path(module_name).stem
            module_spec = importlib.util.spec_from_file_location(name, module_name)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            # A console script does not put the working directory on sys.path; `python -m` does.
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except CliError:
        raise
    except SystemExit as error:  # the user's module ended the program while importing
        raise CliError(
            f"--model: importing {module_name!r} called sys.exit({error.code!r}); a model "
            "module must only define the factory when imported"
        ) from None
    except ModuleNotFoundError as error:
        raise CliError(
            f"--model: cannot import {module_name!r} ({_one_line(error)}); run from the folder "
            "that holds it, or add that folder to PYTHONPATH"
        ) from None
    except Exception as error:  # the user's module raised while importing
        raise CliError(
            f"--model: importing {module_name!r} failed: {type(error).__name__}: {_one_line(error)}"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise CliError(f"--model: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise CliError(f"--model: {spec} is a {type(factory).__name__}, not a callable")
    return factory


def _make_model(spec: str) -> torch.nn.Module:
    factory = load_factory(spec)
    try:
        model = factory()
    except SystemExit as error:  # not an Exception: it would end curvkern without a word
        raise CliError(
            f"--model: calling {spec}() called sys.exit({error.code!r}) instead of returning "
            "an nn.Module"
        ) from None
    except Exception as error:
        raise CliError(
            f"--model: calling {spec}() failed: {type(error).__name__}: {_one_line(error)}"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"--model: {spec}() must return an nn.Module, got {type(model).__name__}")
    return model


def checkpoint_epochs(pattern: str) -> dict[int, str]:
    """The files a glob matches, by epoch: the last number in each file name (ckpt_012.pt -> 12).

    Unlike curvkern.checkpoints.checkpoint_epochs, which falls back to positions in the list,
    the command line requires a distinct number in every name: positions shift when a later
    run's glob matches more files, and resuming would then skip the wrong epochs.
    """
    files = sorted(glob.glob(pattern, recursive=True))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise CliError(f"--checkpoints: {pattern!r} matches no file")
    epochs: dict[int, str] = {}
    for file in files:
        epoch = epoch_in_name(file)
        if epoch is None:
            raise CliError(
                f"--checkpoints: {file} has no number in its name to take its epoch from "
                "(name checkpoints like epoch_007.pt)"
            )
        if epoch in epochs:
            raise CliError(
                f"--checkpoints: {epochs[epoch]} and {file} both give epoch {epoch} (the last "
                "number in the name); narrow the glob"
            )
        epochs[epoch] = file
    return dict(sorted(epochs.items()))


# -- commands -----------------------------------------------------------------------------------


def cmd_info(args) -> int:
    import curvkern

    print(f"curvkern {curvkern.__version__} ({Path(curvkern.__file__).parent})")
    cuda = f", built for CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU-only build"
    print(f"torch {torch.__version__}{cuda}; Python {sys.version.split()[0]}")
    if curvkern.has_kernels():
        version = curvkern.ops.cuda_version()
        cuda_kernels = (
            f"CUDA kernels built for CUDA {version // 1000}.{version % 1000 // 10}"
            if version >= 0
            else "no CUDA kernels (CPU-only build)"
        )
        print(f"compiled kernels: CPU kernels; {cuda_kernels}")
    else:
        from curvkern._extension import missing_kernels_message

        print(f"compiled kernels: none ({missing_kernels_message('cpu')})")
        print("  scoring falls back to the plain-PyTorch backend (slower, same numbers)")
    print(f"devices: cpu ({torch.get_num_threads()} threads)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            usable = "kernels" if curvkern.kernels_available(f"cuda:{i}") else "torch backend"
            print(
                f"  cuda:{i} {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                f"compute capability {props.major}.{props.minor} ({usable})"
            )
    else:
        print("  no CUDA device visible")
    return 0


def _check_fit(model: torch.nn.Module, data: Data, device: torch.device, spec: str) -> None:
    """One forward pass and loss on two samples, so that data the model cannot take fails now
    with one line, not in the middle of scoring."""
    x, y = torch.utils.data.default_collate([data.dataset[i] for i in range(min(2, len(data)))])
    try:
        with torch.no_grad():
            out = model(x.to(device))
    except Exception as error:
        raise CliError(
            f"--data: the model from {spec} cannot take x of shape {tuple(x.shape[1:])} per "
            f"sample: {type(error).__name__}: {_one_line(error)}"
        ) from None
    # The loss the scorer uses (cross entropy of the logits: a tensor, the first element of a
    # tuple such as (logits, aux), or .logits), so that what it accepts is accepted here.
    try:
        logits = losses.logits_of(out)
        losses.cross_entropy(out, y.to(device))
    except Exception as error:
        raise CliError(
            f"--model: the model from {spec} returned {_describe(out)}, and the command line "
            f"scores the cross entropy of (N, C) class scores (a tensor, or the first element "
            f"of a tuple) with the labels: {type(error).__name__}: {_one_line(error)}"
        ) from None
    out = logits
    top = int(data.labels.max())
    if out.ndim == 2 and top >= out.shape[1]:
        raise CliError(
            f"--data: {data.source} has labels up to {top}, but the model from {spec} gives "
            f"{out.shape[1]} class scores per sample"
        )


def _describe(output) -> str:
    """A model output in a few words: a tensor's shape, a tuple's length and first element."""
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, (tuple, list)):
        first = _describe(output[0]) if output else "nothing"
        return f"a {type(output).__name__} of {len(output)} whose first element is {first}"
    return f"a {type(output).__name__}"


def _scoring_error(error: Exception, epoch: int, file: str) -> CliError:
    """A scoring pass's error as one line naming the argument that caused it."""
    text = _one_line(error)
    if text.startswith("h = "):  # the step is below x's resolution
        return CliError(f"--h: {text}")
    if text.startswith("x has non-finite values"):
        return CliError(f"--data: {text}")
    return CliError(f"scoring epoch {epoch} ({file}) failed: {type(error).__name__}: {text}")


def _worker_message(error: DataError) -> str:
    """A DataError's own message, also when a DataLoader worker raised it (torch then puts the
    worker's traceback in the message, the original error on its last line)."""
    lines = str(error).strip().splitlines()
    last = re.match(r"(?:[\w.]+\.)?DataError: (.*)", lines[-1].strip())
    return last.group(1) if len(lines) > 1 and last else str(error)


def _open_tracker(scorer, num_samples, out, model_factory, data_fingerprint) -> CurvatureTracker:
    """The tracker of `score`, recording the model factory and data; its warning that an
    existing file cannot be checked (it does not record them) is printed as one line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        tracker = CurvatureTracker(
            scorer,
            num_samples,
            out,
            model_factory=model_factory,
            data_fingerprint=data_fingerprint,
        )
    for warning in caught:
        print(f"curvkern: warning: {_one_line(warning.message)}", file=sys.stderr)
    return tracker


def cmd_score(args) -> int:
    from tqdm.auto import tqdm

    if args.n_probes < 1:
        raise CliError(f"--n-probes must be at least 1, got {args.n_probes}")
    if not (args.h > 0 and math.isfinite(args.h)):
        raise CliError(f"--h must be a positive finite number, got {args.h}")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise CliError(
            f"--workers must be at least 0 (0 reads the data in the main process), got "
            f"{args.workers}"
        )
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise CliError(f"--device: cannot use {args.device!r} ({_one_line(error)})") from None
    out = Path(args.out)
    checkpoints = checkpoint_epochs(args.checkpoints)
    transform = load_factory(args.transform) if args.transform else None
    data = load_data(args.data, transform, x_column=args.x_column, y_column=args.y_column)
    data_fingerprint = fingerprint(data)  # of the data as stored, before any cast below
    model = _make_model(args.model).to(device)
    dtype = next(model.parameters(), torch.empty(0)).dtype
    if data.images is not None and data.images.dtype != dtype and dtype.is_floating_point:
        # x saved in another float precision than the model's (NumPy's default is float64):
        # scored in the model's precision, which the scorer requires of its inputs.
        data.dataset = torch.utils.data.TensorDataset(
            torch.from_numpy(data.images).to(dtype), torch.from_numpy(data.labels)
        )
    if isinstance(data.dataset, TableDataset) and dtype.is_floating_point:
        data.dataset.dtype = dtype  # the same for a table's array column
    scorer_kwargs = {"h": args.h, "n_probes": args.n_probes, "method": args.method}
    # The tracker checks an existing --out file (its settings and N) before any long work.
    try:
        tracker = _open_tracker(
            CurvatureScorer(model, **scorer_kwargs), len(data), out, args.model, data_fingerprint
        )
    except (ValueError, TimeoutError) as error:
        raise CliError(f"--out: {_one_line(error)}") from None
    except (OSError, KeyError) as error:
        raise CliError(
            f"--out: {out} exists but is not a curvkern tracker file ({_one_line(error)}); "
            "choose another path"
        ) from None
    _agree_on_epochs(tracker, out)
    say = print if is_main_process() else _quiet
    done = set(tracker.epochs)
    pending = {e: f for e, f in checkpoints.items() if e not in done}
    skipped = sorted(set(checkpoints) & done)
    if skipped:
        say(
            f"{len(skipped)} of {len(checkpoints)} checkpoints already scored in {out} "
            f"(epochs {format_ranges(skipped)}): not scored again"
        )
    if not pending:
        say(f"nothing to score: {out} has every epoch the checkpoints give")
        return 0

    # Load every pending checkpoint once before scoring any: a checkpoint that does not fit
    # fails in seconds, not after hours.
    with restored_state(model):
        for file in pending.values():
            try:
                load_checkpoint(model, file, device)
            except Exception as error:
                raise CliError(
                    f"--checkpoints: {file} does not fit the model from {args.model}: "
                    f"{load_error_line(error)}"
                ) from None
    _check_fit(model, data, device, args.model)

    loader = _score_loader(data, args, device)
    say(
        f"scoring {len(pending)} checkpoints x {len(data):,} samples of {args.data} on {device} "
        f"(method {args.method}, {args.n_probes} probes, h = {args.h:g}) into {out}" + _ranks_note()
    )
    show = sys.stderr.isatty() and is_main_process()
    start = time.perf_counter()
    # One scorer and one tracker (read once, above) for every checkpoint; the tracker saves
    # after each epoch, so that an interrupted run resumes.
    try:
        with tqdm(total=len(pending), unit="checkpoint", disable=not show) as bar:
            with restored_state(model):
                for epoch, file in pending.items():
                    begin = time.perf_counter()
                    load_checkpoint(model, file, device)
                    try:
                        tracker.score_epoch(loader, epoch, progress=show, device=device)
                    except DataError as error:
                        raise DataError(_worker_message(error)) from None
                    except (ValueError, TypeError) as error:
                        raise _scoring_error(error, epoch, file) from None
                    check_ranks()  # rank 0 saved it (or failed to)
                    bar.update()
                    if is_main_process():
                        tqdm.write(f"epoch {epoch} ({file}): {time.perf_counter() - begin:.1f} s")
    except (TimeoutError, TrackerConflictError) as error:  # another writer holds the file
        raise CliError(f"--out: {_one_line(error)}") from None
    # Other writers' epochs count too: the tracker took them in when it saved.
    say(f"done in {time.perf_counter() - start:.1f} s: {out} ({len(tracker.epochs)} epochs)")
    return 0


# -- score on several processes (torchrun) ------------------------------------------------------


def _quiet(*args, **kwargs) -> None:
    """print on ranks other than 0: one process speaks for the job."""


def _ranks_note() -> str:
    if not is_distributed():
        return ""
    import torch.distributed as dist

    return f", {dist.get_world_size()} processes"


def _agree_on_epochs(tracker: CurvatureTracker, out: Path) -> None:
    """Every rank must resume from the same epochs, or they would score different checkpoints."""
    if not is_distributed():
        return
    import torch.distributed as dist

    check_ranks()  # every rank got this far: the collectives below follow on all of them
    seen: list[list[int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, list(tracker.epochs))
    if any(epochs != seen[0] for epochs in seen):
        raise CliError(
            f"--out: the ranks see different epochs in {out} (rank 0: {seen[0]}, this rank: "
            f"{tracker.epochs}); put --out on a file system that every node shares"
        )


class _ShardLoader:
    """This rank's batches of the single-process run: batch k of ``batch_size`` consecutive ids
    goes to rank k mod world, so each batch is the one a single process scores (same rows in
    one pass, hence the same rounding) and no id is scored twice, whatever N and world are.

    Before each batch, and for the batches other ranks have beyond this one's, every rank passes
    :func:`check_ranks`, so that a rank that fails stops the others within a batch.
    """

    def __init__(self, data: Data, batch_size: int, workers: int, pin: bool) -> None:
        import torch.distributed as dist

        n, world, rank = len(data), dist.get_world_size(), dist.get_rank()
        batches = -(-n // batch_size)
        mine = range(rank, batches, world)
        ids = [i for k in mine for i in range(k * batch_size, min((k + 1) * batch_size, n))]
        self.steps = -(-batches // world)  # batches of the rank with most
        self.dataset = IndexedDataset(torch.utils.data.Subset(data.dataset, ids))
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, num_workers=workers, pin_memory=pin
        )
        self.sampler = self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        done = 0
        for batch in self.loader:
            check_ranks()
            yield batch
            done += 1
        for _ in range(self.steps - done):
            check_ranks()


def _score_loader(data: Data, args, device: torch.device):
    """The DataLoader of `score`: all of the data set, or under torchrun this rank's shard."""
    pin = device.type == "cuda"
    if is_distributed():
        return _ShardLoader(data, args.batch_size, args.workers, pin)
    return torch.utils.data.DataLoader(
        IndexedDataset(data.dataset),
        batch_size=args.batch_size,
        num_workers=args.workers,
        pin_memory=pin,
    )


def _score_distributed(args) -> int:
    """`score` under torchrun: joins the process group, scores this rank's shard of every
    checkpoint, and when any rank fails, ends every rank with status 2 and one line for the
    job (the failing rank's)."""
    import torch.distributed as dist

    created = not is_distributed()  # a group made before main() (by a script) is left as is
    try:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(device)
        except RuntimeError as error:
            raise CliError(f"--device: cannot use {device!r} ({_one_line(error)})") from None
        try:
            args.device = str(init_from_environment(device))
        except ValueError as error:
            raise CliError(str(error)) from None
    except CliError as error:  # before the process group: every rank says the same, rank 0 tells
        if os.environ.get("RANK") == "0":
            print(f"curvkern: error: {error}", file=sys.stderr)
        return USAGE_EXIT
    try:
        status = cmd_score(args)
    except RankFailed:  # another rank failed and said why
        _exit_together()
    except Exception as error:
        _fail_together(error)
        _exit_together()
    if created:
        dist.destroy_process_group()
    return status


def _fail_together(error: Exception) -> None:
    """This rank failed: stops every rank (see curvkern.distributed.fail_ranks) and prints one
    line per distinct message, from the lowest rank that has it."""
    import torch.distributed as dist

    line = (
        str(error)
        if isinstance(error, (CliError, DataError))
        else (f"{type(error).__name__}: {_one_line(error)}")
    )
    rank = dist.get_rank()
    say = True
    try:
        fail_ranks(line)
    except RankFailed as failed:
        first = {m: r for r, m in reversed(failed.failures)}
        say = first.get(line) == rank
    except Exception:  # the other ranks are gone: say it here
        pass
    if say:
        print(f"curvkern: error: rank {rank}: {line}", file=sys.stderr, flush=True)


def _exit_together() -> NoReturn:
    """Every rank ends with status 2 at the same moment: torchrun stops the other ranks (with
    SIGTERM, reported as their status) as soon as one has exited, so none may linger in the
    interpreter's shutdown."""
    import torch.distributed as dist

    with contextlib.suppress(Exception):  # a peer already gone: nothing to wait for
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(USAGE_EXIT)


# -- export -------------------------------------------------------------------------------------


EXPORT_FORMATS = (".parquet", ".csv")


def cmd_export(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in EXPORT_FORMATS:
        raise CliError(
            f"--out: the format comes from the extension, one of {', '.join(EXPORT_FORMATS)}; "
            f"got {args.out!r}"
        )
    path = Path(args.path)
    if not path.is_file():
        raise CliError(f"PATH: tracker file {path} does not exist (write it with `curvkern score`)")
    try:
        tracker = CurvatureTracker.load(path)
    except (OSError, ValueError, KeyError) as error:
        raise CliError(
            f"PATH: {path} is not a curvkern tracker file ({_one_line(error)})"
        ) from None
    try:
        frame = tracker.to_pandas()
        if out.suffix.lower() == ".csv":
            frame.to_csv(out, index=False)
        else:
            frame.to_parquet(out, index=False)
    except ImportError as error:
        raise CliError(
            f"export needs pandas and pyarrow ({_one_line(error)}); pip install 'curvkern[data]'"
        ) from None
    except OSError as error:
        raise CliError(f"--out: cannot write {out} ({_one_line(error)})") from None
    print(
        f"wrote {out}: {len(frame):,} samples x {frame.shape[1]} columns, "
        f"{len(tracker.epochs)} epochs"
    )
    return 0


def _add_data_columns(parser: argparse.ArgumentParser) -> None:
    """--x-column / --y-column: which columns of a `datasets` folder or Parquet data to score."""
    from .data import X_COLUMNS, Y_COLUMNS

    parser.add_argument(
        "--x-column",
        default=None,
        metavar="NAME",
        help="for a `datasets` folder or Parquet: the input column "
        f"(default: the first of {', '.join(X_COLUMNS)})",
    )
    parser.add_argument(
        "--y-column",
        default=None,
        metavar="NAME",
        help=f"the label column (default: the first of {', '.join(Y_COLUMNS)})",
    )


def _add_export(sub) -> None:
    export = sub.add_parser(
        "export",
        help="write a tracker file's per-sample table to Parquet or CSV",
        description="One row per sample id: the mean of every score field over the scored "
        "epochs, every training-dynamics baseline, and the number of epochs scored.",
    )
    export.add_argument("path", metavar="PATH", help="tracker file written by `curvkern score`")
    export.add_argument(
        "--out", required=True, metavar="FILE", help="FILE.parquet or FILE.csv (by extension)"
    )


def cmd_report(args) -> int:
    if args.top < 1:
        raise CliError(f"--top must be at least 1, got {args.top}")
    path = Path(args.path)
    if not path.is_file():
        raise CliError(f"PATH: tracker file {path} does not exist (write it with `curvkern score`)")
    try:
        scores = load_scores(path)
    except (OSError, ValueError, KeyError) as error:
        raise CliError(
            f"PATH: {path} is not a curvkern tracker file ({_one_line(error)})"
        ) from None
    data = load_data(args.data)
    if scores.num_samples != len(data):
        raise CliError(
            f"--data: {args.data} has {len(data):,} samples but {path} scored "
            f"{scores.num_samples:,}; give the data the scores were made on"
        )
    _check_report_data(path, data)
    start = time.perf_counter()
    size = build_report(scores, data, args.out, top=args.top, title=args.title)
    print(
        f"wrote {args.out} ({size / 1e6:.2f} MB, {time.perf_counter() - start:.1f} s): "
        f"{len(data):,} samples, {len(scores.epochs)} epochs"
    )
    return 0


def _check_report_data(path: Path, data: Data) -> None:
    """Other data of the same N than the tracker file was scored on is refused, naming what
    differs; a file that recorded no fingerprint (older, or written from Python without one)
    gets a warning that it cannot be checked."""
    from . import io

    metadata = io.read_metadata(path)
    if (metadata.get("origin") or {}).get("data") is None:
        print(
            f"curvkern: warning: {path} does not record which data it was scored on, so --data "
            "cannot be checked against it: make sure it is the data that was scored",
            file=sys.stderr,
        )
        return
    try:
        io.check_origin(path, metadata, {"data": fingerprint(data)}, what=f"--data {data.source}")
    except ValueError as error:
        raise CliError(f"--data: {_one_line(error)}") from None


def cmd_merge(args) -> int:
    from . import io

    out = Path(args.out)
    for file in args.paths:
        if not Path(file).is_file():
            raise CliError(f"PATHS: tracker file {file} does not exist")
    try:
        epochs = io.merge_trackers(args.paths, out)
    except (ValueError, KeyError, TimeoutError) as error:
        raise CliError(f"merge: {_one_line(error)}") from None
    print(
        f"merged {len(args.paths)} files into {out}: {len(epochs)} epochs "
        f"({format_ranges(epochs) if epochs else 'none'})"
    )
    return 0


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="curvkern",
        description="Score training samples by input curvature over saved checkpoints, and "
        "write a report.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("info", help="version, compiled kernels, devices")

    score = sub.add_parser(
        "score",
        help="score saved checkpoints into a tracker file (resumes)",
        description="Scores every checkpoint (epochs from the numbers in the file names) into "
        "a tracker file; epochs already in it are not scored again.",
    )
    score.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="a function returning the untrained model (module importable from "
        "the working directory or PYTHONPATH, or a path to a .py file)",
    )
    score.add_argument(
        "--checkpoints",
        required=True,
        metavar="GLOB",
        help="state_dict files, e.g. 'ckpt/epoch_*.pt' (quote it)",
    )
    score.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help=".npz with x (N, ...) and y (N,), an ImageFolder directory, a `datasets` folder "
        "(save_to_disk) or Parquet files (a file, a folder or a quoted glob)",
    )
    score.add_argument("--out", required=True, metavar="PATH", help="tracker file (.npz)")
    score.add_argument("--n-probes", type=int, default=10, metavar="N")
    score.add_argument(
        "--h",
        type=float,
        default=1e-3,
        metavar="H",
        help="finite-difference step, in the model's input units",
    )
    score.add_argument("--method", choices=METHODS, default="fd")
    score.add_argument("--batch-size", type=int, default=256, metavar="B")
    score.add_argument(
        "--device",
        default=None,
        metavar="DEV",
        help="cpu, cuda, cuda:1, ... (default: cuda when available)",
    )
    score.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="W",
        help="DataLoader worker processes (image decoding)",
    )
    score.add_argument(
        "--transform",
        default=None,
        metavar="MODULE:OBJECT",
        help="for an image folder: PIL image -> tensor (default: ToTensor)",
    )
    _add_data_columns(score)

    report = sub.add_parser(
        "report",
        help="write one self-contained HTML report",
        description="Writes one HTML file (no network needed to open it): the highest-scored "
        "samples of each class, histograms, curvature against the baselines, a table, a CSV.",
    )
    report.add_argument("path", metavar="PATH", help="tracker file written by `curvkern score`")
    report.add_argument("--data", required=True, metavar="DATA", help="the data that was scored")
    report.add_argument("--out", required=True, metavar="REPORT.html")
    report.add_argument(
        "--top", type=int, default=12, metavar="K", help="samples shown per class (default 12)"
    )
    report.add_argument("--title", default=None, help="page title (default: the tracker file)")
    _add_merge_parser(sub)
    _add_export(sub)
    return parser


def _add_merge_parser(sub) -> None:
    merge = sub.add_parser(
        "merge",
        help="merge tracker files of one data set and the same settings (a job array's parts)",
        description="Merges tracker files written with the same settings, model and data (e.g. "
        "one per job of a job array) into one; an epoch in several files must have the same "
        "scores in each. --out may be one of the inputs (the others are added to it).",
    )
    merge.add_argument("paths", nargs="+", metavar="PATHS", help="tracker files to merge")
    merge.add_argument("--out", required=True, metavar="ALL.npz", help="the merged tracker file")


def _attach_negative_numbers(argv: list[str]) -> list[str]:
    """``--opt -1e-3`` as ``--opt=-1e-3``: argparse takes a value in scientific notation that
    starts with '-' for an option and answers "expected one argument", where the option's own
    check has the clear message."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if token.startswith("--") and "=" not in token and value and value.startswith("-"):
            try:
                float(value)
            except ValueError:
                pass
            else:
                out.append(f"{token}={value}")
                i += 2
                continue
        out.append(token)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvkern`` console script; returns the exit status."""
    commands = {
        "info": cmd_info,
        "score": cmd_score,
        "report": cmd_report,
        "merge": cmd_merge,
        "export": cmd_export,
    }
    try:
        argv = _attach_negative_numbers(sys.argv[1:] if argv is None else list(argv))
        args = build_parser().parse_args(argv)
        if args.command == "score" and launched_distributed():
            return _score_distributed(args)
        return commands[args.command](args)
    except (CliError, DataError) as error:
        print(f"curvkern: error: {error}", file=sys.stderr)
        return USAGE_EXIT
    except KeyboardInterrupt:
        print(
            "curvkern: interrupted (scored epochs are saved; run again to resume)", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
