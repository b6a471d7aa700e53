"""The words of the tiny corpus: word lists, sentence templates, questions and answers.

Everything the corpus says is generated here from small closed vocabularies, so a tiny model
can learn it and an eval can score it by exact match. Functions take a ``random.Random`` and
return plain strings; nothing here touches audio or images.
"""
from __future__ import annotations

import random

NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "diamond")
WORDS = ("cat", "sun", "box", "tree", "fish", "moon")
OBJECTS = ("cup", "ball", "book", "chair", "hat", "key", "lamp", "shoe", "kite", "bag")

# Stage 1: ASR instructions.
ASR_PROMPTS = (
    "Transcribe the speech.",
    "Write down what is said.",
    "What does the speaker say?",
    "Please transcribe this recording.",
)

# Stage 2: questions about a rendered image, several phrasings per type; answers are one word.
IMAGE_QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("What color is the shape?", "What color is it?", "Name the color."),
    "shape": ("What shape is it?", "Which shape is this?", "Name the shape."),
    "word": ("What word is written?", "Which word is this?", "Read the word."),
}
IMAGE_ANSWERS: dict[str, tuple[str, ...]] = {"color": COLORS, "shape": SHAPES, "word": WORDS}

SOUND_QUESTIONS = ("What do you hear?", "Describe the sound.", "What sound is this?",
                   "Name the sound.")
# Stage 0: typed requests to say a sound caption back, so that the tiny base model can say the
# captions (a pretrained LLM can) and stage 2 has mainly to learn which sound is which.
SAY_PROMPTS = ("Say: {}", "Repeat: {}", "Write: {}", "Say this: {}", "Repeat after me: {}",
               "Copy: {}")

# Stage 3: needles hidden in long recordings, and the questions that find them.
CODE_WORDS = ("banana", "mango", "cherry", "lemon", "grape", "peach")
NEEDLES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # kind: (sentence template, question, possible answers)
    "code": ("The secret code word is {}.", "What is the secret code word?", CODE_WORDS),
    "number": ("The magic number is {}.", "What is the magic number?", NUMBERS[1:9]),
}

# Stage 4: plain text questions with short spoken answers.
THING_COLORS = (("sky", "blue"), ("grass", "green"), ("snow", "white"), ("banana", "yellow"),
                ("tomato", "red"), ("coal", "black"), ("sea", "blue"), ("milk", "white"),
                ("cherry", "red"), ("leaf", "green"), ("lemon", "yellow"), ("orange", "orange"))
SIDES = (("triangle", "three"), ("square", "four"), ("pentagon", "five"), ("hexagon", "six"),
         ("octagon", "eight"))
LEGS = (("bird", "two"), ("dog", "four"), ("horse", "four"), ("ant", "six"), ("spider", "eight"))


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def asr_sentences(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[str]:
    """``n`` distinct short phrases (two or three words: under a second of speech) from the
    word lists, none in ``exclude``: "Three red cups.", "The green kite.", "Six circles."."""
    def one() -> str:
        num, color = rng.choice(NUMBERS), rng.choice(COLORS)
        obj, shape = rng.choice(OBJECTS), rng.choice(SHAPES)
        options = (
            f"{num.capitalize()} {color} {obj if num == 'one' else plural(obj)}.",
            f"The {color} {obj}.",
            f"A {color} {shape}.",
            f"{color.capitalize()} {plural(obj)}.",
            f"{num.capitalize()} {shape if num == 'one' else plural(shape)}.",
        )
        return rng.choice(options)

    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        s = one()
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def text_qa_pairs() -> list[tuple[str, str]]:
    """Every plain-text (question, answer) pair of stage 4, in a fixed order (130 pairs):
    color facts, sides of shapes, legs of animals, number order, sums and differences up to
    ten."""
    pairs = [(f"What color is the {t}?", f"The {t} is {c}.") for t, c in THING_COLORS]
    pairs += [(f"How many sides does a {s} have?", f"A {s} has {n} sides.") for s, n in SIDES]
    pairs += [(f"How many legs does a {a} have?", f"A {a} has {n} legs.") for a, n in LEGS]
    for i in range(9):
        a, b = NUMBERS[i], NUMBERS[i + 1]
        pairs.append((f"What number comes after {a}?", f"{b.capitalize()} comes after {a}."))
        pairs.append((f"What number comes before {b}?", f"{a.capitalize()} comes before {b}."))
    for a in range(1, 10):
        for b in range(1, 11 - a):
            pairs.append((f"What is {NUMBERS[a - 1]} plus {NUMBERS[b - 1]}?",
                          f"{NUMBERS[a - 1].capitalize()} plus {NUMBERS[b - 1]} is "
                          f"{NUMBERS[a + b - 1]}."))
    for a in range(2, 11):
        for b in range(1, a):
            pairs.append((f"What is {NUMBERS[a - 1]} minus {NUMBERS[b - 1]}?",
                          f"{NUMBERS[a - 1].capitalize()} minus {NUMBERS[b - 1]} is "
                          f"{NUMBERS[a - b - 1]}."))
    return pairs


def image_qa_answer(qtype: str, answer: str) -> str:
    """The sentence answer of stage 4 to an image question ("The shape is red.")."""
    if qtype == "color":
        return f"The shape is {answer}."
    if qtype == "shape":
        return f"It is a {answer}."
    return f"The word is {answer}."


def vocabulary_text() -> str:
    """Every word list, prompt and template once: tokenizer training text that does not
    depend on how many samples a build draws (a small build still gives 244 merges)."""
    lines = [" ".join(NUMBERS), " ".join(COLORS), " ".join(SHAPES), " ".join(WORDS),
             " ".join(OBJECTS), " ".join(plural(o) for o in OBJECTS + SHAPES),
             " ".join(CODE_WORDS), *ASR_PROMPTS, *SOUND_QUESTIONS,
             *(p.format("") for p in SAY_PROMPTS)]
    for qs in IMAGE_QUESTIONS.values():
        lines += qs
    for template, question, answers in NEEDLES.values():
        lines += [question, *(template.format(a) for a in answers)]
    for q, a in text_qa_pairs():
        lines += [q, a]
    for qtype, answers in IMAGE_ANSWERS.items():
        lines += [image_qa_answer(qtype, a) for a in answers]
    return "\n".join(lines)
