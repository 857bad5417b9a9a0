"""Command line: `specdec generate | serve | bench | distill | models`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .errors import SpecDecError
from .model_args import add_model_args, load_engine

GREEN, RESET = "\033[32m", "\033[0m"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except SpecDecError as exc:
        print(f"specdec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Lossless speculative decoding.")
    sub = parser.add_subparsers(dest="command")

    gen = sub.add_parser("generate", help="generate text from a prompt")
    add_model_args(gen)
    gen.add_argument("--prompt", help="prompt text (default: read stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    add_sampling_args(gen)
    constraint = gen.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", metavar="FILE", help="the output follows this JSON schema (a file)")
    constraint.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    constraint.add_argument("--regex", help="the output matches this regular expression")
    constraint.add_argument("--grammar", metavar="FILE", help="the output follows this Lark grammar (a file)")
    gen.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids and stats")
    gen.add_argument("--show-provenance", action="store_true",
                     help="colour tokens accepted from the draft (green) apart from those the target produced")
    gen.set_defaults(run=_generate)

    from .bench.cli import add_bench_parser
    from .distill.cli import add_distill_parser
    from .server.cli import add_serve_parser

    add_serve_parser(sub)
    add_bench_parser(sub)
    add_distill_parser(sub)

    models = sub.add_parser("models", help="list the models specdec can load by short name")
    models.set_defaults(run=_models)
    return parser


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--num-draft-tokens", type=_draft_tokens, default=None, metavar="K|adaptive",
                   help="tokens drafted per step; 0 = plain decoding (default: adaptive)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, -2..2 (default: 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, -2..2 (default: 0)")
    p.add_argument("--logit-bias", action="append", default=[], type=_token_bias, metavar="ID:BIAS",
                   help="add BIAS (-100..100) to token ID's logit (repeatable)")


def _token_bias(value: str) -> tuple[int, float]:
    token, _, bias = value.partition(":")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID:BIAS, got {value!r}") from None


def _draft_tokens(value: str) -> int | None:
    if value == "adaptive":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'adaptive', got {value!r}") from None


def sampling_params(args: argparse.Namespace):
    from .sampling_params import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, num_draft_tokens=args.num_draft_tokens,
                          stop=tuple(args.stop), presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, logit_bias=tuple(args.logit_bias),
                          response_format=_response_format(args))


def _response_format(args: argparse.Namespace) -> dict | None:
    """--json-schema, --json-object, --regex or --grammar as a response_format (response_format.py)."""
    if getattr(args, "json_object", False):
        return {"type": "json_object"}
    if getattr(args, "regex", None) is not None:
        return {"type": "regex", "regex": args.regex}
    if getattr(args, "grammar", None) is not None:
        return {"type": "grammar", "grammar": _read_file(args.grammar, "--grammar")}
    if getattr(args, "json_schema", None) is None:
        return None
    try:
        schema = json.loads(_read_file(args.json_schema, "--json-schema"))
    except json.JSONDecodeError as exc:
        raise SpecDecError(f"--json-schema: {args.json_schema} is not JSON: {exc}") from None
    return {"type": "json_schema", "json_schema": {"name": Path(args.json_schema).stem, "schema": schema}}


def _read_file(path: str, option: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SpecDecError(f"{option}: cannot read {path}: {exc.strerror}") from None


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise SpecDecError("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
    return sys.stdin.read()


def _generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # validate before the (slow) model load
    prompt = _read_prompt(args)
    if not prompt:
        raise SpecDecError("prompt is empty")
    engine = load_engine(args)
    prompt_ids = engine.encode_chat([{"role": "user", "content": prompt}]) if args.chat else engine.encode(prompt)
    generation = engine.start(prompt_ids, params)
    colour = args.show_provenance and sys.stdout.isatty()
    shown = _ProvenanceText(engine) if args.show_provenance else None
    while not generation.finished:
        step = generation.step()
        if args.json:
            continue
        if shown is not None:
            sys.stdout.write(shown.render(step.token_ids, generation.stats.provenance, colour, step.finished))
        else:
            sys.stdout.write(step.text)
        sys.stdout.flush()
    out = generation.output()
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "stats": out.stats.to_dict()}))
    else:
        sys.stdout.write("\n")
        print(f"[{engine.drafter_name}] {out.stats.summary()}", file=sys.stderr)
    return 0


class _ProvenanceText:
    """Renders tokens one by one, green where the draft's token was accepted."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.ids: list[int] = []
        self.text = ""

    def render(self, new_ids: list[int], provenance: list[str], colour: bool, finished: bool) -> str:
        pieces = []
        for token in new_ids:
            self.ids.append(token)
            text = self.engine.decode(self.ids)
            delta, self.text = text[len(self.text):], text
            if colour and provenance[len(self.ids) - 1] == "draft":
                delta = f"{GREEN}{delta}{RESET}"
            elif not colour and provenance[len(self.ids) - 1] == "draft":
                delta = f"[{delta}]"
            pieces.append(delta)
        return "".join(pieces)


def _models(args: argparse.Namespace) -> int:
    from .loading.registry import DEFAULT_TARGET, DRAFTS, REGISTRY

    for name, entry in REGISTRY.items():
        default = " (default)" if name == DEFAULT_TARGET else ""
        present = "present" if entry.present() else f"not installed ({entry.install_hint})"
        print(f"{name}{default}\t~{entry.approx_size_mb} MB\t{present}\t{entry.description}")
    for name, draft in DRAFTS.items():
        present = "present" if draft.present() else "missing from this installation"
        print(f"{name}\tdraft for {draft.target}\t{present}\t{draft.description}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
