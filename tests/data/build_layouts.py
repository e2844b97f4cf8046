"""Writes the layout files in this folder from one hand-written set of preference pairs.

Run it from the repository root (`python tests/data/build_layouts.py`) to regenerate them; the
files are checked in, so tests never run it. Each file holds the same 30 questions in one of
the layouts users download (no download here: the content is written by hand):

  uf_h4.jsonl       HuggingFaceH4/ultrafeedback_binarized: prompt string, prompt_id, chosen and
                    rejected message lists that repeat the user turn, messages, float scores
  uf_trl.jsonl      trl-lib/ultrafeedback_binarized: chosen/rejected message lists (implicit
                    prompt), float scores
  trl_implicit.jsonl  TRL's standard implicit-prompt layout: chosen/rejected plain strings that
                    share the prompt as a prefix
  hh.jsonl          Anthropic/hh-rlhf text, some rows with two turns
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

HERE = Path(__file__).parent

# (question, better answer, worse answer, chosen score, rejected score)
PAIRS = [
    ("What is the capital of Australia?", "The capital of Australia is Canberra.",
     "The capital of Australia is Sydney, its largest city.", 9.0, 3.5),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have six legs, like all insects.", 8.5, 2.0),
    ("Translate 'good morning' into French.", "\"Good morning\" in French is \"bonjour\".",
     "It is \"bonne nuit\".", 9.5, 1.0),
    ("What is 17 multiplied by 3?", "17 × 3 = 51.", "17 × 3 = 54.", 10.0, 1.0),
    ("Name the largest planet in our solar system.", "Jupiter is the largest planet in the solar system.",
     "Saturn, because of its rings.", 9.0, 3.0),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen wrote Pride and Prejudice, published in 1813.",
     "It was written by Charlotte Brontë.", 9.0, 2.5),
    ("Give me a synonym for 'happy'.", "\"Joyful\" is a common synonym for \"happy\".", "Sad.", 8.0, 1.0),
    ("What does HTTP stand for?", "HTTP stands for Hypertext Transfer Protocol.",
     "HTTP means High Transfer Text Process.", 9.5, 2.0),
    ("Is a tomato a fruit or a vegetable?",
     "Botanically a tomato is a fruit (a berry), though it is cooked and sold as a vegetable.",
     "A tomato is a vegetable because it is not sweet.", 8.5, 4.0),
    ("How do I reverse a list in Python?", "Use `my_list.reverse()` to reverse it in place, or `my_list[::-1]` for a reversed copy.",
     "Python lists cannot be reversed; build a new list by hand.", 9.0, 1.5),
    ("What is the boiling point of water at sea level in Celsius?", "Water boils at 100 °C at sea level.",
     "It boils at 90 °C.", 9.0, 1.0),
    ("Suggest a name for a grey cat.", "How about \"Smokey\"? It suits a grey coat.", "Dog.", 7.5, 1.0),
    ("Why is the sky blue?",
     "Sunlight is scattered by air molecules, and shorter (blue) wavelengths scatter much more than red ones (Rayleigh scattering), so the sky looks blue.",
     "Because it reflects the colour of the oceans.", 9.0, 3.0),
    ("What is the square root of 144?", "The square root of 144 is 12.", "It is 14.", 10.0, 1.0),
    ("Write a haiku about autumn.", "Crisp leaves drift and fall\ngolden light on quiet paths\nthe year exhales slow",
     "Autumn is a season. Leaves fall. It is cold.", 8.0, 3.0),
    ("Which gas do plants absorb from the air for photosynthesis?", "Plants absorb carbon dioxide (CO2) and release oxygen.",
     "Plants absorb oxygen and release carbon dioxide during photosynthesis.", 9.0, 2.0),
    ("How many continents are there?", "By the most common convention there are seven continents.",
     "There are five continents and no other way of counting them.", 8.0, 4.5),
    ("What's a good way to keep basil fresh?", "Trim the stems and keep it in a glass of water at room temperature, loosely covered.",
     "Put it in the freezer in a plastic bag.", 8.0, 4.0),
    ("Explain what a prime number is.", "A prime number is a whole number greater than 1 whose only divisors are 1 and itself, like 2, 3, 5 or 7.",
     "A prime number is any odd number.", 9.5, 1.5),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa.", "Michelangelo.", 9.0, 1.0),
    ("Convert 5 kilometres to miles.", "5 km is about 3.11 miles.", "5 km is 8 miles.", 9.0, 1.0),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", "Go.", 9.5, 1.0),
    ("Recommend a book for learning statistics.", "\"The Art of Statistics\" by David Spiegelhalter is a clear, friendly introduction.",
     "Read any book; they are all the same.", 8.0, 2.0),
    ("What year did the first person walk on the Moon?", "Neil Armstrong walked on the Moon in 1969.",
     "It happened in 1975.", 9.5, 1.0),
    ("How long should I boil an egg for a soft yolk?", "About 6 minutes in boiling water, then cool it in cold water.",
     "Boil it for 20 minutes.", 8.5, 2.0),
    ("What is the difference between weather and climate?", "Weather is the short-term state of the atmosphere; climate is its average over decades.",
     "They are the same thing.", 9.0, 1.5),
    ("Spell 'necessary'.", "n-e-c-e-s-s-a-r-y", "n-e-c-c-e-s-a-r-y", 9.0, 1.0),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest.", "The Atlantic Ocean.", 9.0, 2.0),
    ("What does a thermometer measure?", "A thermometer measures temperature.", "It measures air pressure.", 9.0, 1.0),
    ("  Is zero an even number?  ", "Yes. Zero is even: it is divisible by 2 with no remainder.",
     "No, zero is neither even nor odd.", 9.0, 2.5),
]


def _u(t):
    return {"role": "user", "content": t}


def _a(t):
    return {"role": "assistant", "content": t}


def main() -> None:
    h4, trl, implicit, hh = [], [], [], []
    for i, (q, good, bad, sg, sb) in enumerate(PAIRS):
        pid = hashlib.sha256(q.encode()).hexdigest()
        h4.append({"prompt": q, "prompt_id": pid, "chosen": [_u(q), _a(good)], "rejected": [_u(q), _a(bad)],
                   "messages": [_u(q), _a(good)], "score_chosen": sg, "score_rejected": sb})
        trl.append({"chosen": [_u(q), _a(good)], "rejected": [_u(q), _a(bad)], "score_chosen": sg, "score_rejected": sb})
        implicit.append({"chosen": f"Question: {q}\nAnswer: {good}", "rejected": f"Question: {q}\nAnswer: {bad}"})
        pre = f"\n\nHuman: {q}\n\nAssistant:"
        if i % 3 == 0:
            pre = f"\n\nHuman: Hi, can I ask you something?\n\nAssistant: Of course, go ahead.{pre}"
        hh.append({"chosen": f"{pre} {good}", "rejected": f"{pre} {bad}"})
    for name, rows in (("uf_h4", h4), ("uf_trl", trl), ("trl_implicit", implicit), ("hh", hh)):
        with open(HERE / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
