"""`lyra-pl chat --export DIR`: talk to a stage export, with images, video and audio.

The model is a stage's export directory (``<stage run>/export``) on the frozen Qwen2-VL and
Whisper weights its ``base.json`` names, loaded as ``lyra-pl eval`` loads it. Media go
through the training data path: each request becomes an official-format sample, converted
in memory into shard members (PyAV decoding: WAV, FLAC, MP3, M4A, Ogg/Opus audio; PNG, JPEG,
WebP, BMP, GIF images; video files, frame folders or 4x4 frame grids) and decoded, tokenized
and batched by the training decoder and collate. Answers are greedy unless --temperature or
--top-p is given.

  one-shot     --prompt TEXT (may be "" when a spoken --audio is the question): the answer
               streams to stdout; --speech-out FILE --vocoder DIR also speaks it (stage 4).
  interactive  no --prompt: a multi-turn session on stdin; the conversation so far is kept
               and media given on the command line join the first turn.
  batch        --jsonl FILE: one request a line, {"id", "prompt", "image", "video",
               "audio", "sound"} (media: a path or a list; relative to the file's folder),
               one JSON answer a line to stdout or --out.

    lyra-pl chat --export runs/tiny/stage2_joint_sft/export --image cat.png --prompt "What is it?"
    lyra-pl chat --export runs/tiny/stage4_speech_gen/export --audio q.mp3 --prompt "" \\
        --speech-out answer.wav --vocoder vocoder/
    lyra-pl chat --export runs/tiny/stage3_long_speech/export --lmme 4,0.7 --jsonl requests.jsonl
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from lyra_pl.chat_engine import (MEDIA_FIELDS, Chat, ChatError, build, check_paths, empty_media,
                                 find_tokenizer, human_turn, load_vocoder, parse_lmme,
                                 read_request, request_fields, run_config, write_speech)
from lyra_pl.data.conversation import DATA_PLACEHOLDERS, SYSTEM_PROMPT
from lyra_pl.data.media import MediaError
from lyra_pl.data.official import InvalidSample, MediaRoots

SESSION_HELP = """session commands (interactive):
  /image PATH   attach an image to the next message (also /video, /audio, /sound PATH)
  /reset        forget the conversation and any pending attachments
  /help         this list
  /quit         end the session (so does end of input, Ctrl-D)
  an empty line sends the pending attachments alone (e.g. a spoken question)"""


# ----------------------------------------------------------------------------- modes
def one_shot(chat: Chat, raw: dict[str, Any], out: TextIO, speech: tuple | None) -> int:
    try:
        inputs = chat.inputs([raw])
    except ValueError as e:
        raise ChatError(str(e)) from None
    _, units = chat.stream(inputs, out, speech=speech is not None)
    if speech is None:
        return 0
    path, vocoder = speech
    if not units:
        print(f"lyra-pl chat: the speech generator gave no units for this answer; {path} not "
              "written", file=sys.stderr)
        return 1
    write_speech(path, vocoder, units)
    return 0


def interactive(chat: Chat, media: dict[str, list[str]], out: TextIO) -> int:
    """The multi-turn session (:data:`SESSION_HELP`): each message is answered with the whole
    conversation so far, and its media, as the prompt."""
    err = sys.stderr
    roots = MediaRoots.of(Path.cwd())
    prompt = "> " if sys.stdin.isatty() else ""
    if prompt:
        try:  # importing it gives input() line editing and history
            importlib.import_module("readline")
        except ImportError:
            pass
    turns: list[dict[str, str]] = []  # the conversation so far: human, gpt, ...
    history = empty_media()  # the media of those turns, in order
    pending = {k: list(media.get(k, ())) for k in MEDIA_FIELDS}  # for the next message
    print(f"lyra-pl chat: {chat.info['ckpt']} ({chat.info['preset']} on {chat.info['device']})"
          f"\n{SESSION_HELP}", file=err, flush=True)
    while True:
        try:
            line = input(prompt).strip()
        except (EOFError, KeyboardInterrupt):
            print(file=err)
            return 0
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            kind, arg = command[1:], arg.strip().strip("'\"")
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                turns, history, pending = [], empty_media(), empty_media()
                print("(conversation cleared)", file=err)
            elif kind in MEDIA_FIELDS and not arg:
                print(f"error: {command} needs a PATH", file=err)
            elif kind in MEDIA_FIELDS:
                try:
                    check_paths({kind: [arg]}, roots, "/")
                except MediaError as e:
                    print(f"error: {e}", file=err)
                else:
                    pending[kind].append(arg)
                    print(f"(attached {kind} {arg} to the next message)", file=err)
            else:
                print(("" if command == "/help" else f"unknown command {command}\n")
                      + SESSION_HELP, file=err)
            continue
        if not line and not any(pending.values()):
            continue
        turn = {"from": "human", "value": human_turn(line, pending)}
        joined = {k: history[k] + pending[k] for k in MEDIA_FIELDS}
        pending = empty_media()
        try:
            inputs = chat.inputs([build([*turns, turn], joined, roots)])
        except (MediaError, InvalidSample, ValueError) as e:
            print(f"error: {e} (message not sent)", file=err)
            continue
        try:
            answer, _ = chat.stream(inputs, out)
        except KeyboardInterrupt:
            print("\n(interrupted: the message is not kept)", file=err)
            continue
        # The conversation is checked like training data, whose answers hold no media
        # placeholders; a barely trained model can spell one out.
        for p in DATA_PLACEHOLDERS.values():
            answer = answer.replace(p, "")
        turns += [turn, {"from": "gpt", "value": answer}]
        history = joined


def answer_jsonl(chat: Chat, path: Path, out: TextIO, batch_size: int) -> int:
    """Every request of a JSONL file answered in order, one JSON line each; a bad line gets
    an ``error`` line (and one on stderr naming it) and the others still run. Returns 1 when
    a line failed."""
    roots = MediaRoots.of(path.parent)
    counts = {"answer": 0, "error": 0}
    rows: list[dict[str, Any]] = []  # a batch's lines in order, with their raw samples

    def flush() -> None:
        good = [r for r in rows if "raw" in r]
        for row, result in zip(good, _answers(chat, [r.pop("raw") for r in good])):
            row.update({"answer": result} if isinstance(result, str) else {"error": str(result)})
        for row in rows:
            n = row.pop("line")
            if "error" in row:
                print(f"{path}:{n}: {row['error']}", file=sys.stderr)
                row = {"id": row["id"], "line": n, "error": row["error"]}
            counts["error" if "error" in row else "answer"] += 1
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
        rows.clear()

    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row: dict[str, Any] = {"id": n, "line": n}
            try:
                req = read_request(line)
                row["id"] = req.get("id", n)
                prompt, media = request_fields(req)
                check_paths(media, roots, "")
                row["raw"] = build([{"from": "human", "value": human_turn(prompt, media)}],
                                   media, roots)
            except (ValueError, MediaError) as e:  # InvalidSample is a ValueError
                row["error"] = str(e)
            rows.append(row)
            if sum("raw" in r for r in rows) == batch_size:
                flush()
    flush()
    print(f"answered {counts['answer']} of {sum(counts.values())} request(s)"
          + (f"; {counts['error']} failed (above)" if counts["error"] else ""), file=sys.stderr)
    return 1 if counts["error"] else 0


def _answers(chat: Chat, raws: list[dict[str, Any]]) -> list[str | Exception]:
    """Answers to a batch; when it does not decode or collate, its samples are answered
    one at a time, so only the bad one fails."""
    try:
        inputs = chat.inputs(raws)
    except ValueError as e:
        if len(raws) == 1:
            return [e]
        return [a for raw in raws for a in _answers(chat, [raw])]
    return list(chat.answer(inputs)[0])


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", type=Path, required=True,
                        help="a stage export directory (<stage run>/export)")
    for kind, what in (("image", "an image"),
                       ("video", "a video file, frame folder or 4x4 frame-grid image"),
                       ("audio", "speech (WAV, FLAC, MP3, M4A, Ogg ...; a spoken question)"),
                       ("sound", "a non-speech sound clip")):
        parser.add_argument(f"--{kind}", action="extend", nargs="+", default=[], metavar="F",
                            help=f"{what} for the prompt, or the first turn; repeatable")
    parser.add_argument("--prompt", default=None,
                        help="one-shot: answer this and exit (\"\" when --audio asks)")
    parser.add_argument("--jsonl", type=Path, default=None, metavar="FILE",
                        help="answer a file of JSON-lines requests")
    parser.add_argument("--out", type=Path, default=None,
                        help="--jsonl: write the answers here (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=8, help="--jsonl requests a batch")
    parser.add_argument("--speech-out", default=None, metavar="FILE",
                        help="one-shot: also speak the answer into FILE (.wav, .flac ...)")
    parser.add_argument("--vocoder", default=None, metavar="DIR",
                        help="CodeHiFiGAN unit vocoder directory, for --speech-out")
    parser.add_argument("--lmme", type=parse_lmme, default=None, metavar="N,RHO",
                        help="LMME pruning: N blocks, keep ratio RHO (default: the export's)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=None,
                        help="sample at this temperature (default, or 0: greedy)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--system", default=SYSTEM_PROMPT, help="the system prompt")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the "
                        "run's, from <stage run>/config.yaml, else data/tiny/tokenizer)")
    parser.add_argument("--qwen2vl", default=None, help="default: the export's base.json")
    parser.add_argument("--whisper", default=None, help="default: the export's base.json")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if any)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lyra-pl chat", description=__doc__,
                                     epilog=SESSION_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.jsonl is not None and (args.prompt is not None or args.speech_out):
        parser.error("--jsonl answers its own requests: no --prompt or --speech-out with it")
    if args.speech_out and args.prompt is None:
        parser.error("--speech-out speaks a one-shot answer: give --prompt")
    if args.out is not None and args.jsonl is None:
        parser.error("--out is where --jsonl answers go: give --jsonl")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--batch-size and --max-new-tokens must be >= 1")
    try:
        return run(args)
    except (ChatError, MediaError, InvalidSample) as e:
        print(f"lyra-pl chat: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    media = {k: getattr(args, k) for k in MEDIA_FIELDS}
    roots = MediaRoots.of(Path.cwd())
    # What the user named is checked (and read) before the model loads.
    check_paths(media, roots)
    if args.jsonl is not None and not args.jsonl.is_file():
        raise ChatError(f"--jsonl {args.jsonl}: file not found")
    raw = None
    if args.prompt is not None:
        raw = build([{"from": "human", "value": human_turn(args.prompt, media)}], media, roots)
    if not (args.export / "config.json").is_file():
        raise ChatError(f"--export {args.export}: not a stage export directory (no "
                        "config.json); give <stage run>/export")
    config = run_config(args.export)
    speech = None
    if args.speech_out:
        speech = args.speech_out, load_vocoder(args.vocoder, args.speech_out, args.export,
                                               config)
    args.ckpt = args.export  # the name load_for_inference reads
    chat = Chat(args, find_tokenizer(args.tokenizer, config))
    if speech is not None and speech[1].num_units < chat.model.config.n_units:
        raise ChatError(f"--vocoder {args.vocoder} has {speech[1].num_units} units; the "
                        f"model generates {chat.model.config.n_units}")
    if raw is not None:
        return one_shot(chat, raw, sys.stdout, speech)
    if args.jsonl is None:
        return interactive(chat, media, sys.stdout)
    if args.out is None:
        return answer_jsonl(chat, args.jsonl, sys.stdout, args.batch_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        return answer_jsonl(chat, args.jsonl, f, args.batch_size)


if __name__ == "__main__":
    sys.exit(main())
