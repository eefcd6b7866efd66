"""What a person sees of a run on standard error: progress, notes, and the summary.

A rich bar on a terminal, a line every few seconds elsewhere; a reader of
stderr that goes away (``2>&1 | head``) stops the messages, never the run.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vggfeat.text import printable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

    from vggfeat.pipeline import Progress, Summary, Timings
    from vggfeat.search.progress import Step as SearchStep


def console(**options: Any) -> Console:
    """A rich console on which a closed pipe raises ``BrokenPipeError``: rich's own handling
    exits 1, and the command's handler makes a reader going away (``| head``) a quiet 0."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    return _Console(**options)


def drop_stderr() -> None:
    """Standard error's reader went away: later messages go to /dev/null."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def _bar(out: Console, rate: str = "", after: str = "", transient: bool = False) -> RichProgress:
    """A rich progress bar: what, the bar, done of total, ``rate``, time left, ``after``
    (``rate`` and ``after`` are templates of the task's fields)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(rate)] if rate else []
    columns.append(TimeRemainingColumn())
    columns += [TextColumn(after)] if after else []
    return Progress(*columns, console=out, transient=transient)


class _View:
    """What the views share: the stderr console, a rich bar while one is drawn, and a
    reader of stderr that goes away (| head) stopping the messages, never the work."""

    PLAIN_EVERY = 10.0

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.console = console(stderr=True)
        self.bar: RichProgress | None = None
        self.task: TaskID | None = None
        self.last_line = time.monotonic()  # the first line when there is a rate to show

    def __exit__(self, *exc: object) -> None:
        self.pause()

    def pause(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def _guarded(self, show: Callable[[], object]) -> None:
        """``show()``, unless quiet; once stderr's reader has gone, quiet from then on."""
        if self.quiet:
            return
        try:
            show()
        except BrokenPipeError:
            drop_stderr()
            self.quiet = True


class ProgressView(_View):
    """Progress on stderr: a rich bar on a terminal, a line every few seconds elsewhere.

    The rate, and the time left from it, are measured from the first results on: the
    start-up before them (with Ray, the actors building their networks) says nothing of
    how fast the rest goes. No time is forecast before ``MEASURED_OVER`` seconds of it.
    """

    MEASURED_OVER = 5.0

    def __init__(self, quiet: bool) -> None:
        super().__init__(quiet)
        self.first: tuple[float, int] | None = None
        """``elapsed`` and ``done`` when the first results came."""

    def __enter__(self) -> ProgressView:
        if not self.quiet and self.console.is_terminal:
            self.bar = _bar(self.console, "{task.fields[rate]}", "{task.fields[failed]}")
            self.bar.__enter__()
            self.task = self.bar.add_task("starting", total=None, rate="", failed="")
        return self

    def notice(self, line: str) -> None:
        """Show a line the run says stops nothing (a batch capped, a damaged part set aside)."""
        self._guarded(
            lambda: self.console.print(
                f"Note: {printable(line)}", highlight=False, markup=False, soft_wrap=True
            )
        )

    def update(self, progress: Progress) -> None:
        """Show ``progress``."""
        self._guarded(lambda: self._show(progress))

    def _show(self, progress: Progress) -> None:
        if progress.done == 0:
            if progress.already and progress.total:
                self.console.print(
                    f"{count(progress.already, 'image')} already done; {progress.total:,} to do.",
                    highlight=False,
                )
            return
        if self.first is None:
            self.first = (progress.elapsed, progress.done)
            self.last_line = time.monotonic()  # the first line once there is a rate to show
        measured = self._measured(progress, *self.first)
        average = progress.done / progress.elapsed if progress.elapsed > 0 else 0.0
        rate = average if measured is None else measured
        if self.bar is not None and self.task is not None:
            self.bar.update(
                self.task,
                description="extracting",
                completed=progress.done,
                total=progress.total,
                rate=f"{rate:.1f} images/s",
                failed=f"{progress.failed} failed" if progress.failed else "",
            )
            return
        now = time.monotonic()
        if now - self.last_line >= self.PLAIN_EVERY or progress.done == progress.total:
            self.last_line = now
            left = (progress.total - progress.done) / measured if measured else None
            self.console.print(
                f"{progress.done:,}/{progress.total:,} images, {rate:.1f} images/s, "
                f"{progress.failed:,} failed" + (f", {_duration(left)} left" if left else ""),
                highlight=False,
            )

    def _measured(self, progress: Progress, began: float, done: int) -> float | None:
        """Images a second since ``began`` (``elapsed`` when ``done`` were done); None until
        that is ``MEASURED_OVER`` seconds long."""
        seconds = progress.elapsed - began
        if seconds < self.MEASURED_OVER:
            return None
        return (progress.done - done) / seconds


class StepView(_View):
    """A search's progress on stderr: a rich bar per stage on a terminal, a line every
    few seconds elsewhere; nothing for a search done in less."""

    def __init__(self, quiet: bool) -> None:
        super().__init__(quiet)
        self.stage = ""
        self.stage_began = self.last_line

    def __enter__(self) -> StepView:
        if not self.quiet and self.console.is_terminal:
            self.bar = _bar(self.console, transient=True)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.pause()
        self.task, self.stage = None, ""  # the next block draws a bar of its own

    def update(self, step: SearchStep) -> None:
        self._guarded(lambda: self._show(step))

    def _show(self, step: SearchStep) -> None:
        now = time.monotonic()
        if step.stage != self.stage:
            self.stage, self.stage_began = step.stage, now
            if self.bar is not None:
                if self.task is not None:
                    self.bar.remove_task(self.task)
                self.task = self.bar.add_task(step.stage, total=step.total)
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=step.done, total=step.total)
            return
        # A line every so often, for a stage that has lasted long enough to say how fast.
        if step.total is None or now - self.stage_began < self.PLAIN_EVERY:
            return
        if now - self.last_line < self.PLAIN_EVERY and step.done != step.total:
            return
        self.last_line = now
        rate = step.done / (now - self.stage_began)
        left = (step.total - step.done) / rate if rate > 0 else None
        shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
        self.console.print(
            f"{step.stage}: {step.done:,}/{step.total:,} {step.unit}, {shown} {step.unit}/s"
            + (f", {_duration(left)} left" if left else ""),
            highlight=False,
        )


def _duration(seconds: float) -> str:
    """``40 s``, ``12 min``, ``3 h 05 min``: as precise as a forecast deserves."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


def count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def print_summary(summary: Summary) -> None:
    out = console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)
    for line in [_headline(summary), *_remarks(summary)]:
        out.print(line)
    if _nothing_new(summary):
        return
    for failure in summary.failures[:5]:
        # One line, undecodable bytes as \xNN, no control character reaching the terminal.
        path = failure.path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        out.print(f"  failed: {printable(path)}: {printable(failure.reason)}")
    if len(summary.failures) > 5:
        out.print(f"  ... and {len(summary.failures) - 5:,} more, listed in /failed.")
    out.print(
        f"Time: {summary.seconds:.1f} s, {summary.images_per_second:.1f} images/s after start-up "
        f"({_time_split(summary.timings)})."
        + (f" File: {summary.file_bytes / 1e6:,.1f} MB." if summary.assembled else "")
    )
    if summary.computed_by:
        out.print(f"Computed by: {summary.computed_by}.")


def _time_split(timings: Timings) -> str:
    """Where the wall time went, in parts that add up to it; the networks of an engine that
    computes elsewhere (Ray), side by side, after them: their sum is no part of the wall."""
    if timings.network_elsewhere is None:
        return (
            f"start-up {timings.startup:.1f} s, waiting for images {timings.waiting:.1f} s, "
            f"network {timings.network:.1f} s, writing {timings.writing:.1f} s"
        )
    return (
        f"start-up {timings.startup:.1f} s, waiting for the cluster {timings.waiting:.1f} s, "
        f"writing {timings.writing:.1f} s; networks on the cluster "
        f"{timings.network_elsewhere:.1f} s, summed over the actors"
    )


def _nothing_new(summary: Summary) -> bool:
    changed = summary.stored or summary.replaced or summary.dropped
    return summary.assembled and not (summary.computed or summary.failures or changed)


def _headline(summary: Summary) -> str:
    """What the run did to the output, in one line."""
    failed = len(summary.failures)
    if not summary.assembled:
        done = (
            f"{'Shard ' + str(summary.shard) if summary.shard else 'Run'} done: "
            f"{count(summary.computed, 'image')} computed, {failed:,} failed, "
            f"{summary.already:,} done before."
        )
        if not summary.waiting_for:  # every shard is done: another process writes the output
            return f"{done} Every shard is done; another process is writing {summary.output}."
        shards = "shard" if len(summary.waiting_for) == 1 else "shards"
        return (
            f"{done} Waiting for {shards} {', '.join(map(str, summary.waiting_for))}; "
            f"the last to finish writes {summary.output}."
        )
    if _nothing_new(summary):
        every = "the 1 image is" if summary.already == 1 else f"all {summary.already:,} images are"
        return f"Nothing new: {every} already in {summary.output} ({count(summary.rows, 'row')})."
    changes = [count(summary.stored, "new row")]
    if summary.replaced:
        changes.append(f"{summary.replaced:,} replaced")
    if summary.dropped:
        changes.append(f"{summary.dropped:,} dropped")
    return (
        f"Wrote {summary.output}: {', '.join(changes)}, {count(summary.rows, 'row')} in all. "
        f"This run: {count(summary.computed, 'image')} computed, {failed:,} failed, "
        f"{summary.already:,} already done."
    )


def _remarks(summary: Summary) -> list[str]:
    """What else the user should know about the output and how the run went."""
    remarks = []
    if summary.missing:
        names = (
            "names a file that no longer exists"
            if summary.missing == 1
            else ("name files that no longer exist")
        )
        remarks.append(f"{count(summary.missing, 'row')} of {summary.output} {names}; "
                       "--prune drops them.")  # fmt: skip
    if summary.left_for_later:
        remarks.append(
            f"{count(summary.left_for_later, 'image')} found that the unfinished run did not "
            "list when it started; run the same command again once it is written to add them."
        )
    if summary.engine == "ray" and summary.rows_per_node:
        remarks.append(
            "Images per node: "
            + ", ".join(f"{node} {count:,}" for node, count in summary.rows_per_node.items())
        )
    if summary.batch_size < summary.requested_batch_size:
        remarks.append(
            f"Ran out of memory: the batch size was lowered to {summary.batch_size}; "
            f"pass --batch-size {summary.batch_size} next time."
        )
    return remarks
