"""The engine thread's loop: take the scheduler's work, run one step over every running sequence,
hand the chunks to their event loops, retire what finished.

Each step: preempt the newest sequences while the KV cache cannot hold them all, reuse cached
prompt prefixes, forward one token for every decoding sequence and prompt chunks of joining ones
(within max_batch_tokens) in one runner call, score echoed prompts, sample every row that is due
at once, then apply the stopping rules. Only this thread touches the runner and the sequences'
token state.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from services.common.errors import UnavailableError
from services.worker.engine.constraints import TokenMasker
from services.worker.engine.cores import CoreShare
from services.worker.engine.interface import FinishReason, TokenLogprob, TopLogprob
from services.worker.engine.runner import ForwardItem, ModelRunner
from services.worker.engine.sampling import RowLogprobs, sample
from services.worker.engine.scheduler import Scheduler
from services.worker.engine.sequence import QueueItem, SequenceState
from services.worker.engine.stopping import advance

logger = logging.getLogger(__name__)


@dataclass
class StepCounters:
    """Totals for metrics; written by the engine thread only, read by scrapes."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    step_seconds: float = 0.0  # engine steps (forward, masks, sampling), wall time
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0


class StepLoop:
    """Runs on the engine thread until the scheduler says stop. Without a runner (embedding
    models) it only runs the scheduler's jobs."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner | None,
        *,
        masker: TokenMasker | None,
        max_batch_tokens: int,
        decode_special: Callable[[Sequence[int]], str],
        cores: CoreShare | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._cores = cores
        self._runner = runner
        self._masker = masker
        self._max_batch_tokens = max_batch_tokens
        self._decode_special = decode_special
        self._token_texts: dict[int, str] = {}
        self.counters = StepCounters()

    def serve(self) -> None:
        """Steps until the engine stops, then ends what is left: queued jobs fail, sequences get
        a CANCELLED final chunk."""
        runner = self._runner
        cores = self._cores
        threads, busy = torch.get_num_threads(), False
        while (work := self._scheduler.next_work()) is not None:
            if runner is not None:
                for seq in work.retired:
                    runner.release(seq)
            for job in work.jobs:
                job.run()
            if not work.running:
                continue
            if cores is not None:
                if not busy:
                    cores.busy(self)
                    busy = True
                threads = cores.apply(threads)
            started = time.perf_counter()
            try:
                self._step(work.running)
            except Exception as exc:  # the engine thread must survive; the step's requests fail
                logger.exception(
                    "engine step failed; failing %d request(s): %s",
                    len(work.running),
                    " ".join(seq.request_id for seq in work.running),
                )
                for seq in work.running:
                    seq.finished = True
                    self._scheduler.retire(seq)
                    if runner is not None:
                        runner.release(seq)
                self._deliver((seq, exc) for seq in work.running)
            self.counters.step_seconds += time.perf_counter() - started
            if cores is not None and busy and not self._scheduler.has_work():
                cores.idle(self)
                busy = False
        if cores is not None and busy:
            cores.idle(self)
        seqs, jobs = self._scheduler.take_all()
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(UnavailableError("the model is shutting down"))
        if runner is not None:
            for seq in seqs:
                runner.release(seq)
        self._deliver(
            (seq, seq.final_chunk("", FinishReason.CANCELLED)) for seq in seqs if not seq.cancelled
        )

    def _step(self, running: list[SequenceState]) -> None:
        """One forward over every running sequence: a token each for those decoding, prompt
        chunks for those joining (within max_batch_tokens), then sampling where due."""
        runner = self._runner
        assert runner is not None
        # Under KV pressure the newest sequences wait (keeping their output) until room frees.
        for victim in self._scheduler.preempt_to_fit(running, runner.fits):
            runner.release(victim)
            self.counters.preemptions += 1
            # This thread has no request context: the record names its request itself.
            logger.info(
                "preempted %s: the KV cache budget is full",
                victim.request_id,
                extra={"request_id": victim.request_id},
            )
        if runner.prefix_caching:
            self._reuse_prefixes(running)
        budget = self._max_batch_tokens
        decoding = [seq for seq in running if seq.computed == seq.length - 1]
        joining = [seq for seq in running if seq.computed < seq.length - 1]
        items: list[ForwardItem] = []
        for seq in decoding:
            tokens = seq.pending_tokens(1)
            items.append(
                ForwardItem(
                    seq, tokens, seq.computed, True, seq.scoring_prompt, len(seq.prompt_ids)
                )
            )
        budget -= len(decoding)
        for seq in joining:
            if budget <= 0:
                break
            tokens = seq.pending_tokens(budget)
            done = seq.computed + len(tokens) == seq.length
            items.append(
                ForwardItem(
                    seq, tokens, seq.computed, done, seq.scoring_prompt, len(seq.prompt_ids)
                )
            )
            budget -= len(tokens)
        logits = runner.forward(items)
        batch: list[SequenceState] = []
        rows: list[int] = []
        deliveries: list[tuple[SequenceState, QueueItem]] = []
        cursor = 0
        for item in items:
            fed = item.key
            assert isinstance(fed, SequenceState)
            n_rows = item.logit_rows
            if item.all_logits:
                self._score_prompt(fed, item, logits[cursor : cursor + n_rows])
                if not fed.scoring_prompt:
                    fed.echo_pending = False
                    deliveries.append((fed, fed.echo_chunk()))
            fed.computed += len(item.token_ids)
            if item.want_logits:
                if fed.max_tokens == 0:  # score-only: the prompt is all there is
                    self.counters.prompt_tokens += len(fed.prompt_ids)
                    deliveries.append((fed, fed.final_chunk("", FinishReason.LENGTH)))
                    self._scheduler.retire(fed)
                    runner.release(fed)
                else:
                    batch.append(fed)
                    rows.append(cursor + n_rows - 1)
            cursor += n_rows
        if not batch:
            self._deliver(deliveries)
            return
        if len(rows) != logits.shape[0]:
            logits = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
        out = sample(logits, [s.sampling for s in batch], self._masker)
        # A sequence without output samples its first token: its prompt is in the cache now.
        self.counters.prompt_tokens += sum(len(s.prompt_ids) for s in batch if not s.output_ids)
        self.counters.generation_tokens += len(batch)
        for seq, token_id, row_logprobs in zip(batch, out.token_ids, out.logprobs, strict=True):
            logprob = None if row_logprobs is None else self._token_logprob(token_id, row_logprobs)
            chunk = advance(seq, token_id, logprob)
            if chunk is not None:
                deliveries.append((seq, chunk))
            if seq.finished:
                self._scheduler.retire(seq)
                runner.release(seq)
        self._deliver(deliveries)

    def _reuse_prefixes(self, running: list[SequenceState]) -> None:
        """Sequences without a cache row start from the longest prefix of their tokens the
        prefix cache holds (a preempted one usually finds its own)."""
        runner = self._runner
        assert runner is not None
        counters = self.counters
        for seq in running:
            # Scoring the prompt needs every position's logits: nothing can be skipped.
            if seq.computed or seq.prefix_checked or seq.scoring_prompt:
                continue
            seq.prefix_checked = True
            tokens = seq.prompt_ids + seq.output_ids
            seq.computed = runner.reuse_prefix(seq, tokens, len(seq.prompt_ids))
            counters.prefix_queried_tokens += len(tokens)
            counters.prefix_hit_tokens += seq.computed
            if not seq.output_ids:
                seq.cached_prompt_tokens = seq.computed

    def _score_prompt(self, seq: SequenceState, item: ForwardItem, logits: torch.Tensor) -> None:
        """Record the prompt logprobs these rows give: the row at position p scores prompt token
        p + 1. Positions already scored (before a preemption) are skipped."""
        prompt = seq.prompt_ids
        if not seq.prompt_logprobs:  # nothing precedes the first token
            first_token = TokenLogprob(prompt[0], self._token_text(prompt[0]), math.nan)
            seq.prompt_logprobs.append(first_token)
        first = len(seq.prompt_logprobs) - 1 - item.start  # the row scoring the next unscored
        last = min(len(item.token_ids), len(prompt) - 1 - item.start)  # rows past the prompt
        if first >= last:
            return
        logprobs = torch.log_softmax(logits[first:last].float(), dim=-1)
        targets = prompt[item.start + first + 1 : item.start + last + 1]
        target_t = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(1, target_t.unsqueeze(1)).squeeze(1).tolist()
        k = seq.top_prompt_logprobs
        top_values: list[list[float]] = [[] for _ in targets]
        top_ids: list[list[int]] = [[] for _ in targets]
        if k > 0:
            top = logprobs.topk(k, dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        for j, token_id in enumerate(targets):
            row = RowLogprobs(chosen[j], top_ids[j], top_values[j])
            seq.prompt_logprobs.append(self._token_logprob(token_id, row))

    def _token_logprob(self, token_id: int, row: RowLogprobs) -> TokenLogprob:
        top = tuple(
            TopLogprob(i, self._token_text(i), lp)
            for i, lp in zip(row.top_ids, row.top_logprobs, strict=True)
        )
        return TokenLogprob(token_id, self._token_text(token_id), row.logprob, top)

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._decode_special([token_id])
        return text

    def _deliver(self, items: Iterable[tuple[SequenceState, QueueItem]]) -> None:
        """Hand chunks to their event loops: one thread-safe callback per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[QueueItem], QueueItem]]]
        by_loop = {}
        for seq, item in items:
            if seq.loop is not None and not seq.cancelled:
                by_loop.setdefault(seq.loop, []).append((seq.queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                logger.debug("dropping %d chunk(s) for a closed event loop", len(batch))


def _put_all(batch: list[tuple[asyncio.Queue[QueueItem], QueueItem]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)
