"""Verifier-guided step-wise search over decode sessions: the loop shared by DES, beam search and Best-of-N.

A search solves one problem with ``n`` rollouts per step. Its roots are the prompt prefilled once
per routing *slot* (DES: one slot per expert count k; beam search and Best-of-N: the inner strategy
as it is). Step 1 forks the ``n`` rollouts from the roots, spread evenly over the slots (the first
``n % slots`` slots get one more). A rollout decodes until the step separator (a blank line, as the
``arith`` task and search-and-learn write steps), EOS or ``max_tokens``; the last step
(``max_steps``) runs to the end, so every surviving beam ends with an answer. After each step the
verifier scores every candidate's chain, finished candidates are set aside, and the best ``m``
unfinished ones (by the aggregated score; ties, to 1e-6, keep rollout order) are kept; each is forked into
``n / m`` children (the remainder to the best) **with its own slot** — in DES, its k (expert
configuration inheritance). Best-of-N (``keep=None``) never prunes: its ``n`` rollouts decode
uninterrupted and are scored once at the end. The answer is the finished beam with the highest
aggregated score (``select='verifier'``) or the majority answer over finished beams
(``select='vote'``, the best-scored beam carrying it); both are recorded.

All beams of all problems of a call are rows of one decode session: children share their parent's
cached rows (a fork copies them, nothing is recomputed), beams of different slots never share any
(each slot has its own prefill). Randomness: a rollout's sample key is a hash of its parent's key
and its child index (roots: of the search index and the slot), so a search gives the same result
in any batch. Cost: ``forward_passes`` = the search's prefill plus, per step, its longest rollout;
``token_rows`` = rows × tokens over all its beams (rows paused at a separator while others finish
their step are fed padding that is not charged); ``cost['verifier_calls']`` = chains scored,
``cost['expert_rows']`` = token rows × the beam's k (a FLOPs proxy across k), ``cost['rollouts']``,
and ``cost['seconds:verifier']``.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moesteer.answers import Extractor, vote
from moesteer.keys import child_key
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategies.context import RunContext
from moesteer.strategy import TokenStrategy
from moesteer.verifiers import Verifier, aggregate

if TYPE_CHECKING:
    from moesteer.backends.base import Engine, Session

SELECTIONS = ("verifier", "vote")
TIE_DECIMALS = 6


@dataclass(frozen=True)
class Slot:
    """A routing configuration of a search's roots: the token strategy and the k it runs at."""

    strategy: TokenStrategy
    k: int


@dataclass(frozen=True)
class SearchPlan:
    """The loop's parameters: ``keep`` = beams kept per step (``None``: Best-of-N, no pruning)."""

    n: int
    keep: int | None
    max_steps: int
    separator: str
    aggregate: str
    select: str
    temperature: float


@dataclass(eq=False)
class Beam:
    """One candidate chain in flight (or finished)."""

    id: int
    search: int
    k: int
    key: int  # sample key its children's keys derive from
    parent: int | None
    seq: int  # decode-session sequence id
    steps: list[str] = field(default_factory=list)
    step_logprobs: list[list[float]] = field(default_factory=list)
    step_scores: list[float] = field(default_factory=list)
    score: float = 0.0  # the aggregated step scores


@dataclass
class Search:
    """One problem × repeat: its beams, finished pool, cost and trace."""

    problem: int
    repeat: int
    kept: list[Beam] = field(default_factory=list)
    pool: list[tuple[Beam, Completion]] = field(default_factory=list)
    forward_passes: int = 1  # the roots' prefill
    token_rows: int = 0
    cost: Counter = field(default_factory=Counter)
    trace: list[dict] = field(default_factory=list)
    beams_made: int = 0

    def new_id(self) -> int:
        """Beam ids count within a search, so a search's trace does not depend on its batch."""
        self.beams_made += 1
        return self.beams_made - 1


def spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` counts differing by at most one, the larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_search(
    engine: Engine,
    prompts: list,
    sampling: SamplingParams,
    context: RunContext,
    plan: SearchPlan,
    slots: Sequence[Slot],
    verifier: Verifier,
    extract: Extractor,
    *,
    chat: bool = False,
    trace: bool = False,
    prompt_keys: Sequence[int] | None = None,
) -> list[Completion]:
    """``sampling.n`` searches per prompt (prompt-major), each one returned completion."""
    request = engine.request(prompts, slots[0].strategy, sampling, chat=chat, prompt_keys=prompt_keys)
    for slot in slots[1:]:
        engine.check_strategy(slot.strategy)
    questions = [engine.prompt_text(p) for p in prompts]
    rollout = dataclasses.replace(sampling, temperature=plan.temperature, n=1)
    started = time.perf_counter()
    with engine.session(rollout, trace=trace) as session:
        loop = _Loop(engine, session, plan, slots, verifier, questions)
        searches = loop.start(request.prompt_ids, request.keys, sampling.n)
        for step in range(1, plan.max_steps + 1):
            loop.step(searches, step)
            if not any(s.kept for s in searches):
                break
        seconds = time.perf_counter() - started
        return [_result(s, plan, extract, seconds) for s in searches]


class _Loop:
    """The search loop over one decode session (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        session: Session,
        plan: SearchPlan,
        slots: Sequence[Slot],
        verifier: Verifier,
        questions: list[str],
    ) -> None:
        self.engine, self.session, self.plan, self.slots = engine, session, plan, slots
        self.verifier, self.questions = verifier, questions

    def start(self, prompt_ids: list[list[int]], keys: list[int], repeats: int) -> list[Search]:
        """Prefill every (prompt, slot) once; the ``repeats`` searches of a prompt share the prefill."""
        rows = [(p, s) for p in range(len(prompt_ids)) for s in range(len(self.slots))]
        seqs = self.session.add(
            [prompt_ids[p] for p, _ in rows],
            [self.slots[s].strategy for _, s in rows],
            [keys[p] for p, _ in rows],
            copies=repeats,
        )
        searches = [Search(p, r) for p in range(len(prompt_ids)) for r in range(repeats)]
        for i, seq in enumerate(seqs):
            (p, s), r = rows[i // repeats], i % repeats
            index = p * repeats + r
            root = Beam(searches[index].new_id(), index, self.slots[s].k, child_key(r, s), None, seq)
            searches[index].kept.append(root)
        return searches

    def step(self, searches: list[Search], step: int) -> None:
        last = step == self.plan.max_steps or self.plan.keep is None
        candidates = self._expand(searches, step)
        before = {
            c.seq: (len(self.session.seqs[c.seq].tokens), self.session.seqs[c.seq].forward_passes) for c in candidates
        }
        self.session.run(until=None if last else self.plan.separator)
        longest: Counter = Counter()
        for c in candidates:
            seq = self.session.seqs[c.seq]
            start, passes = before[c.seq]
            longest[c.search] = max(longest[c.search], seq.forward_passes - passes)
            self._record_steps(c, seq.tokens[start:], seq.logprobs[start - seq.prompt_len :], rollout=not last)
        for index, passes in longest.items():
            searches[index].forward_passes += passes
        self._score(searches, candidates)
        by_search: dict[int, list[Beam]] = {}
        for c in candidates:
            by_search.setdefault(c.search, []).append(c)
        gone = [seq for index, beams in by_search.items() for seq in self._prune(searches[index], beams, step, last)]
        if gone:
            self.session.drop(gone)

    # ---- one step -------------------------------------------------------------------------------

    def _expand(self, searches: list[Search], step: int) -> list[Beam]:
        """Fork this step's rollouts from every search's kept beams (step 1: the roots), replacing
        the parents, in one session call."""
        plan: list[tuple[Search, Beam, list[int]]] = []
        for search in searches:
            parents, search.kept = search.kept, []
            for parent, count in zip(parents, spread(self.plan.n, len(parents)), strict=True):
                plan.append((search, parent, [child_key(parent.key, c) for c in range(count)]))
        for search, parent, _ in plan:
            self._charge(search, parent)
        forked = self.session.fork_many([(parent.seq, keys) for _, parent, keys in plan], replace=True)
        children = []
        for (search, parent, keys), seqs in zip(plan, forked, strict=True):
            for seq, key in zip(seqs, keys, strict=True):
                parent_id = parent.id if step > 1 else None
                child = Beam(search.new_id(), parent.search, parent.k, key, parent_id, seq)
                child.steps, child.step_logprobs = list(parent.steps), list(parent.step_logprobs)  # steps only grow
                children.append(child)
            search.cost["rollouts"] += len(seqs)
        return children

    def _record_steps(self, beam: Beam, tokens: list[int], logprobs: list[float], rollout: bool) -> None:
        """Append the steps decoded in this call (a rollout step is one step, even if empty)."""
        pieces = segment_steps(self.engine.tokenizer, tokens, logprobs, self.plan.separator, self.engine.eos_ids)
        if rollout and not pieces:
            pieces = [("", list(logprobs))]
        for text, lps in pieces:
            beam.steps.append(text)
            beam.step_logprobs.append(lps)

    def _score(self, searches: list[Search], beams: list[Beam]) -> None:
        start = time.perf_counter()
        scored = self.verifier.score(
            [self.questions[searches[b.search].problem] for b in beams],
            [b.steps for b in beams],
            [b.step_logprobs for b in beams] if self.verifier.needs_logprobs else None,
        )
        seconds = (time.perf_counter() - start) / max(len(beams), 1)
        for beam, scores in zip(beams, scored, strict=True):
            beam.step_scores, beam.score = list(scores), aggregate(scores, self.plan.aggregate)
            searches[beam.search].cost["verifier_calls"] += 1
            searches[beam.search].cost["seconds:verifier"] += seconds

    def _prune(self, search: Search, beams: list[Beam], step: int, last: bool) -> list[int]:
        """Set finished beams aside and keep the best ``m`` unfinished ones; returns the session
        sequences of the others, to drop."""
        finished = [b for b in beams if last or self.session.seqs[b.seq].finished is not None]
        active = [b for b in beams if b not in finished]
        ranked = sorted(active, key=lambda b: -_rank(b.score))  # stable: ties keep rollout order
        search.kept = ranked[: self.plan.keep or 0]
        for beam in finished:
            completion = self.session.completion(beam.seq, prompt_index=search.problem, sample_index=len(search.pool))
            search.pool.append((beam, completion))
        kept = {b.id for b in search.kept}
        search.trace.append(
            {
                "step": step,
                "beams": [
                    {
                        "id": b.id,
                        "parent": b.parent,
                        "k": b.k,
                        "score": b.score,
                        "finished": b in finished,
                        "kept": b.id in kept,
                    }
                    for b in beams
                ],
            }
        )
        dropped = [b for b in beams if b.id not in kept]
        for beam in dropped:
            self._charge(search, beam)
        return [b.seq for b in dropped]

    def _charge(self, search: Search, beam: Beam) -> None:
        """Add a beam's token rows to its search (before its session sequence goes)."""
        rows = self.session.seqs[beam.seq].token_rows
        search.token_rows += rows
        search.cost["expert_rows"] += rows * beam.k


def segment_steps(
    tokenizer, tokens: list[int], logprobs: list[float], separator: str, eos: frozenset[int] = frozenset()
) -> list[tuple[str, list[float]]]:
    """Split generated tokens into steps at ``separator``: ``(text, its tokens' log-probs)`` per
    non-empty step, texts stripped. A token that straddles the separator belongs to the step it
    ends; the text after the separator in it starts the next step. A final EOS token is not part
    of any step."""
    if tokens and tokens[-1] in eos:
        tokens, logprobs = tokens[:-1], logprobs[: len(tokens) - 1]
    pieces: list[tuple[str, list[float]]] = []
    carry, current, current_lp = "", [], []
    for token, lp in zip(tokens, logprobs, strict=True):
        current.append(token)
        current_lp.append(lp)
        text = carry + tokenizer.decode(current, skip_special_tokens=True)
        if separator in text:
            head, _, carry = text.partition(separator)
            pieces.append((head, current_lp))
            current, current_lp = [], []
    tail = carry + (tokenizer.decode(current, skip_special_tokens=True) if current else "")
    pieces.append((tail, current_lp))
    return [(text.strip(), lps) for text, lps in pieces if text.strip()]


def _rank(score: float) -> float:
    """Scores equal to 1e-6 rank as ties (kept in rollout order): the float noise of another batch
    layout must not reorder beams."""
    return round(score, TIE_DECIMALS)


def _result(search: Search, plan: SearchPlan, extract: Extractor, seconds: float) -> Completion:
    """The search's answer completion (see the module docstring), its pool as ``samples``."""
    pool = search.pool
    by_score = lambda i: (_rank(pool[i][0].score), -i)  # noqa: E731  (ties: the earliest beam)
    best = max(range(len(pool)), key=by_score)
    votes = vote([c for _, c in pool], extract)
    answers, winner = votes.answers, votes.winner
    voted = best if winner is None else max((i for i in range(len(pool)) if answers[i] == winner), key=by_score)
    chosen = best if plan.select == "verifier" else voted
    beam, completion = pool[chosen]
    samples = [dataclasses.replace(c, info={"score": b.score, "step_scores": b.step_scores, "k": b.k}) for b, c in pool]
    info = {
        "answer": answers[chosen],
        "answer_verifier": answers[best],
        "answer_vote": winner,
        "votes": votes.counts,
        "score": beam.score,
        "trace": search.trace,
    }
    return dataclasses.replace(
        completion,
        sample_index=search.repeat,
        forward_passes=search.forward_passes,
        token_rows=search.token_rows,
        seconds=seconds,
        samples=samples,
        info=info,
        cost=dict(search.cost),
    )
