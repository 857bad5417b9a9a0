"""What one generation cost and how well the draft fitted: the metrics users decide with."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DRAFT = "draft"  # an accepted draft token
TARGET = "target"  # a token the target produced itself (recovered, bonus or plain decoding)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    target_forward_passes: int = 0  # verify (or plain decode) passes; the prefill is not counted
    draft_forward_passes: int = 0
    target_positions: int = 0  # token positions run through the target after the prefill (its compute)
    draft_positions: int = 0  # token positions run through the draft model
    per_position_drafted: list[int] = field(default_factory=list)  # [i]: drafts proposed at position i
    per_position_accepted: list[int] = field(default_factory=list)  # [i]: of those, accepted
    provenance: list[str] = field(default_factory=list)  # per output token: "draft" or "target"
    prefill_time_s: float = 0.0
    time_to_first_token_s: float = 0.0
    wall_time_s: float = 0.0
    finish_reason: str | None = None

    def record_step(self, num_drafted: int, num_accepted: int, draft_passes: int, draft_positions: int) -> None:
        self.target_forward_passes += 1
        self.target_positions += num_drafted + 1
        self.draft_forward_passes += draft_passes
        self.draft_positions += draft_positions
        self.drafted_tokens += num_drafted
        self.accepted_tokens += num_accepted
        grow = num_drafted - len(self.per_position_drafted)
        if grow > 0:
            self.per_position_drafted.extend([0] * grow)
            self.per_position_accepted.extend([0] * grow)
        for i in range(num_drafted):
            self.per_position_drafted[i] += 1
        for i in range(num_accepted):
            self.per_position_accepted[i] += 1

    @classmethod
    def of_choices(cls, stats: list["GenerationStats"]) -> "GenerationStats":
        """One request's n choices together (its usage): the prompt once, every count summed."""
        total = cls(prompt_tokens=stats[0].prompt_tokens)
        for s in stats:
            for name in ("generated_tokens", "drafted_tokens", "accepted_tokens", "target_forward_passes",
                         "draft_forward_passes", "target_positions", "draft_positions"):
                setattr(total, name, getattr(total, name) + getattr(s, name))
        return total

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Output tokens per target pass (accepted + 1 on average); 1.0 for plain decoding."""
        return self.generated_tokens / self.target_forward_passes if self.target_forward_passes else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.per_position_accepted, self.per_position_drafted)]

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            acceptance_rate=self.acceptance_rate,
            mean_accepted_length=self.mean_accepted_length,
            per_position_acceptance=self.per_position_acceptance,
            tokens_per_second=self.tokens_per_second,
        )
        return data

    def summary(self) -> str:
        return (
            f"{self.generated_tokens} tokens in {self.wall_time_s:.2f} s ({self.tokens_per_second:.1f} tok/s), "
            f"acceptance {self.acceptance_rate:.0%} ({self.accepted_tokens}/{self.drafted_tokens}), "
            f"mean accepted length {self.mean_accepted_length:.2f}, {self.target_forward_passes} target passes"
        )
