"""
toy_tldr.py -- the embedded synthetic TL;DR world: posts, human-like summaries, a hidden true scorer.

The paper's experiment runs Pythia on Reddit TL;DR. That needs a GPU and the internet; this file
builds a small world with the same shape that runs on a laptop and whose *truth we know*:

  * posts in the paper's prompt template `SUBREDDIT: r/... TITLE: ... POST: ... TL;DR:` built
    from a few key facts (who, what happened, how the poster feels, what they ask) hidden among
    distractor and filler sentences;
  * reference summaries written from templates, good but imperfect (a feeling or the question is
    sometimes left out), so a policy has room to improve on them;
  * `true_score(prompt, summary)`: the hidden "human" scorer (facts covered, wrong or invented
    facts, length, repetition, a proper ending). It labels the "human" preference pairs with
    Bradley-Terry noise, and evaluation calls it to ask whether the gold reward model is exploited;
  * a word-level tokenizer built with the `tokenizers` library, saved as a Hugging Face tokenizer.

Run:   python toy_tldr.py                      (writes out/toy_tldr/, a few seconds)
       python toy_tldr.py --num_sft 2000 --out_dir /tmp/w
Output: sft.jsonl {prompt, completion}; prefs_human.jsonl
{prompt, chosen, rejected, chosen_score, rejected_score}; eval.jsonl {prompt, reference};
tokenizer/; config.json.
"""
import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass, field

from stage import check_args, check_output, cleans_up, one_process_only, parse_args, start_output

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class Args:
    out_dir: str = field(default="out/toy_tldr", metadata={"help": "where the world is written"})
    seed: int = field(default=0, metadata={"help": "one seed makes the whole world"})
    num_sft: int = field(default=20000, metadata={
        "help": "prompts with a reference summary (SFT + DAA prompts)"})
    num_human_pairs: int = field(default=12000, metadata={"help": "'human' preference pairs for the gold RM"})
    num_eval: int = field(default=512, metadata={"help": "held-out evaluation prompts with a reference"})
    bt_temperature: float = field(default=0.3, metadata={
        "help": "Bradley-Terry temperature of the human labels (lower = less noise)"})


# ----------------------------------------------------------------------------------------------
# the world's words. Slot lists are disjoint, so every summary word has one meaning.

WHO = ["boyfriend", "girlfriend", "mom", "dad", "sister", "brother", "roommate", "boss", "coworker",
       "friend", "husband", "wife", "neighbor", "landlord", "cousin", "uncle", "aunt", "grandma",
       "teacher", "ex"]
# event keyword -> the phrase it opens (the keyword is what the scorer looks for)
EVENTS = {"cheated": "cheated on me", "lied": "lied to me", "ghosted": "ghosted me",
          "yelled": "yelled at me", "ignored": "ignored me", "borrowed": "borrowed my car",
          "crashed": "crashed my car", "forgot": "forgot my birthday", "stole": "stole my money",
          "proposed": "proposed to me", "cancelled": "cancelled our trip",
          "insulted": "insulted my family", "snooped": "snooped through my phone",
          "quit": "quit their job", "moved": "moved out", "blamed": "blamed me",
          "invited": "invited my rival", "skipped": "skipped my wedding", "sold": "sold my guitar",
          "read": "read my diary"}
FEELINGS = ["angry", "sad", "confused", "hurt", "anxious", "betrayed", "lost", "stressed",
            "jealous", "scared", "guilty", "lonely", "furious", "worried", "embarrassed"]
QUESTIONS = ["leave", "forgive", "confront", "apologize", "wait", "talk", "stay", "report",
             "ignore", "call", "move", "text"]
WHEN = ["yesterday", "last week", "last night", "two days ago", "this morning", "last month"]
SUBREDDITS = ["relationships", "relationship_advice", "tifu", "AskReddit", "offmychest",
              "dating_advice", "legaladvice", "personalfinance"]
TITLES = ["need advice", "what do i do ?", "am i overreacting ?", "long story , please help",
          "throwaway for obvious reasons", "not sure how to handle this", "help me think"]
JOBS = ["nurse", "cashier", "programmer", "driver", "chef", "student", "plumber", "barista"]
PETS = ["dog", "cat", "parrot", "hamster", "rabbit", "turtle"]
WEATHER = ["rainy", "cold", "sunny", "windy", "grey", "hot"]
CITIES = ["boston", "denver", "austin", "seattle", "chicago", "portland", "dallas", "miami"]
AGES = ["19", "22", "25", "27", "31", "34", "40"]

FEELING_SENTENCES = ["i feel so {f} .", "honestly i am {f} .", "i have been {f} since then .",
                     "it made me {f} ."]
QUESTION_SENTENCES = ["should i {q} ?", "do you think i should {q} ?", "is it okay to {q} ?",
                      "would it be wrong to {q} ?"]
DISTRACTOR_SENTENCES = ["my {who2} says i should {q2} .", "my {who2} thinks i am {f2} ."]
FILLER_SENTENCES = ["i work as a {job} .", "we have a {pet} .", "the weather was {weather} .",
                    "we live in {city} .", "i am {age} years old ."]
# reference summary pieces: event part, feeling part, question part
REF_EVENT = ["my {who} {ev}", "{who} {ev}", "my {who} {ev} {when}"]
REF_FEELING = [" . i feel {f}", " , now i am {f}", " and i am {f}", " . feeling {f}"]
REF_QUESTION = [" . should i {q} ?", " . {q} or not ?", " . do i {q} ?"]

SLOT_WORDS = set(WHO) | set(EVENTS) | set(FEELINGS) | set(QUESTIONS)
# words whose repetition is natural; any other repeated word costs (a degenerate summary loops)
FUNCTION_WORDS = {"my", "i", "me", "and", "or", "not", "to", "the", "a", ".", ",", "?", "am",
                  "is", "do", "should", "feel", "feeling", "now", "on", "at", "our", "their"}
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]

# words of the details that are not the point: when it happened (a summary pays for each)
DETAIL_WORDS = {w for phrase in WHEN for w in phrase.split()}
# the true scorer's weights (METHOD.md, section 8), in hundredths: integers, so that equal scores are equal
GAIN = {"who": 100, "event": 100, "feeling": 80, "question": 80}
WRONG_SLOT, REPEAT, DETAIL, GOOD_END, NO_EOS = -100, -60, -30, 50, -150
LONG_AFTER, LONG_COST, SHORT_BEFORE, SHORT_COST = 14, -15, 5, -30
P_WHEN = 0.6  # references that tell when it happened (pi_ref learns to; the true scorer charges for it)


def vocabulary():
    """Every word the world can write, in a fixed order (the tokenizer's vocabulary)."""
    words = ["SUBREDDIT:", "TITLE:", "POST:", "TL;DR:"] + [f"r/{s}" for s in SUBREDDITS]
    texts = (WHO + list(EVENTS.values()) + FEELINGS + QUESTIONS + WHEN + TITLES + JOBS + PETS
             + WEATHER + CITIES + AGES + FEELING_SENTENCES + QUESTION_SENTENCES
             + DISTRACTOR_SENTENCES + FILLER_SENTENCES + REF_EVENT + REF_FEELING + REF_QUESTION)
    for text in texts:
        for w in text.split():
            if not w.startswith("{") and w not in words:
                words.append(w)
    return SPECIAL_TOKENS + words


# ----------------------------------------------------------------------------------------------
# posts and reference summaries


def make_post(rng):
    """One post: its facts and its prompt text in the paper's template."""
    facts = {"who": rng.choice(WHO), "event": rng.choice(list(EVENTS)),
             "feeling": rng.choice(FEELINGS), "question": rng.choice(QUESTIONS),
             "when": rng.choice(WHEN)}
    sentences = [f"my {facts['who']} {EVENTS[facts['event']]} {facts['when']} .",
                 rng.choice(FEELING_SENTENCES).format(f=facts["feeling"])]
    if rng.random() < 0.7:  # a distractor: other slot values, so copying the wrong words costs
        sentences.append(rng.choice(DISTRACTOR_SENTENCES).format(
            who2=rng.choice([w for w in WHO if w != facts["who"]]),
            q2=rng.choice([q for q in QUESTIONS if q != facts["question"]]),
            f2=rng.choice([f for f in FEELINGS if f != facts["feeling"]])))
    for template in rng.sample(FILLER_SENTENCES, rng.randint(1, 2)):
        sentences.append(template.format(job=rng.choice(JOBS), pet=rng.choice(PETS),
                                         weather=rng.choice(WEATHER), city=rng.choice(CITIES),
                                         age=rng.choice(AGES)))
    rng.shuffle(sentences)
    sentences.append(rng.choice(QUESTION_SENTENCES).format(q=facts["question"]))
    prompt = (f"SUBREDDIT: r/{rng.choice(SUBREDDITS)} TITLE: {rng.choice(TITLES)} "
              f"POST: {' '.join(sentences)} TL;DR:")
    return facts, prompt


def reference_summary(facts, rng):
    """A human-like summary: the event (told with its when 60% of the time), the feeling 70% and the
    question 80% of the time."""
    event = REF_EVENT[2] if rng.random() < P_WHEN else rng.choice(REF_EVENT[:2])  # [2] tells when
    text = event.format(who=facts["who"], ev=EVENTS[facts["event"]], when=facts["when"])
    if rng.random() < 0.7:
        text += rng.choice(REF_FEELING).format(f=facts["feeling"])
    if rng.random() < 0.8:
        text += rng.choice(REF_QUESTION).format(q=facts["question"])
    else:
        text += " ."
    return text


def parse_facts(prompt):
    """Read the key facts back from a prompt (the scorer needs only the prompt text)."""
    post = prompt.split("POST:", 1)[-1].rsplit("TL;DR:", 1)[0].split()
    sentences, current = [], []
    for w in post:
        current.append(w)
        if w in (".", "?"):
            sentences.append(current)
            current = []
    facts = {}
    for s in sentences:
        if s[0] == "my" and len(s) > 2 and s[2] in EVENTS:
            facts["who"], facts["event"] = s[1], s[2]
        elif s[0] != "my" and s[-1] == "." and any(w in FEELINGS for w in s):
            facts["feeling"] = next(w for w in s if w in FEELINGS)
        elif s[-1] == "?" and any(w in QUESTIONS for w in s):
            facts["question"] = next(w for w in s if w in QUESTIONS)
    if len(facts) != 4:
        raise ValueError(f"not a toy_tldr prompt (found facts {sorted(facts)}): {prompt[:80]!r}")
    return facts


def true_score(prompt, summary, finished=True):
    """The hidden human judgement of a summary (max 4.1; references average about 3.25).

    summary: the response text (no EOS); finished: whether the response ended with EOS.
    """
    facts = parse_facts(prompt)
    words = summary.split()
    score = 0
    for slot, gain in GAIN.items():
        score += gain * (facts[slot] in words)
    right = set(facts.values())
    score += WRONG_SLOT * sum(1 for w in words if w in SLOT_WORDS and w not in right)
    score += DETAIL * sum(1 for w in words if w in DETAIL_WORDS)
    seen = set()
    for w in words:
        if w not in FUNCTION_WORDS:
            score += REPEAT * (w in seen)
            seen.add(w)
    score += LONG_COST * max(0, len(words) - LONG_AFTER) + SHORT_COST * max(0, SHORT_BEFORE - len(words))
    if not finished:
        score += NO_EOS
    elif words and words[-1] in (".", "?"):
        score += GOOD_END
    return score / 100


# ----------------------------------------------------------------------------------------------
# "human" preference pairs: two corrupted copies of a reference, labelled by Bradley-Terry


def corrupt(prompt, summary, rng):
    """One random edit of the kind a weak policy makes."""
    facts, words = parse_facts(prompt), summary.split()
    post_words = [w for w in prompt.split("POST:")[1].split() if w != "TL;DR:"]
    kind = rng.choice(["drop_slot", "swap_slot", "distractor", "repeat", "copy_post", "truncate",
                       "add_slot", "drop_end", "drop_span", "drop_start", "loop", "off_topic"])
    slot_pos = [i for i, w in enumerate(words) if w in SLOT_WORDS]
    if kind == "drop_slot" and slot_pos:
        del words[rng.choice(slot_pos)]
    elif kind == "swap_slot" and slot_pos:
        i = rng.choice(slot_pos)
        pool = next(p for p in (WHO, list(EVENTS), FEELINGS, QUESTIONS) if words[i] in p)
        words[i] = rng.choice([w for w in pool if w != words[i]])
    elif kind == "distractor":
        words.insert(rng.randint(0, len(words)), rng.choice(sorted(SLOT_WORDS - set(facts.values()))))
    elif kind == "repeat" and len(words) > 2:
        i = rng.randrange(len(words) - 1)
        span = words[i:i + rng.randint(2, 4)]
        words[i:i] = span
    elif kind == "copy_post":
        i = rng.randrange(max(1, len(post_words) - 6))
        words += post_words[i:i + rng.randint(3, 8)]
    elif kind == "truncate" and len(words) > 3:
        words = words[:rng.randint(2, len(words) - 1)]
    elif kind == "add_slot":
        missing = [facts[s] for s in ("feeling", "question") if facts[s] not in words]
        if missing:
            words.insert(max(0, len(words) - 1), rng.choice(missing))
    elif kind == "drop_end" and words and words[-1] in (".", "?"):
        words = words[:-1]
    elif kind == "drop_span" and len(words) > 3:
        i = rng.randrange(len(words) - 2)
        del words[i:i + rng.randint(2, 5)]
    elif kind == "drop_start" and len(words) > 3:
        words = words[rng.randint(2, min(6, len(words) - 1)):]
    elif kind == "loop" and len(words) > 3:  # the degenerate loops of an over-optimised policy
        i = rng.randrange(len(words) - 3)
        span = words[i:i + rng.randint(3, 5)]
        words = words[:i] + span * rng.randint(2, 4) + words[i + len(span):]
    elif kind == "off_topic":  # a sentence of the post that is not the point
        sentences = " ".join(post_words).replace("?", ".").split(".")
        words = rng.choice([s for s in sentences if s.strip()]).split() + ["."]
    return " ".join(words)


def human_pair(prompt, reference, rng, bt_temperature):
    """Two versions of a reference with 0-2 and 1-3 edits; the 'human' picks one by Bradley-Terry."""
    a, b = reference, reference
    for _ in range(rng.randint(0, 2)):
        a = corrupt(prompt, a, rng)
    for _ in range(rng.randint(1, 3)):
        b = corrupt(prompt, b, rng)
    if rng.random() < 0.5:
        a, b = b, a
    sa, sb = true_score(prompt, a), true_score(prompt, b)
    p_a = 1.0 / (1.0 + math.exp(-(sa - sb) / bt_temperature))
    if rng.random() < p_a:
        return {"prompt": prompt, "chosen": a, "rejected": b, "chosen_score": sa, "rejected_score": sb}
    return {"prompt": prompt, "chosen": b, "rejected": a, "chosen_score": sb, "rejected_score": sa}


# ----------------------------------------------------------------------------------------------
# tokenizer and writing


def build_tokenizer():
    """A word-level Hugging Face tokenizer over `vocabulary()` (whitespace-split, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_world(args):
    """All rows of the world, deterministic for args.seed. Streams are separate per split."""
    def split(stream, n):
        rng = random.Random(f"{args.seed}-{stream}")
        return [(rng,) + make_post(rng) for _ in range(n)]

    sft = [{"prompt": p, "completion": reference_summary(f, rng)} for rng, f, p in split("sft", args.num_sft)]
    human = [human_pair(p, reference_summary(f, rng), rng, args.bt_temperature)
             for rng, f, p in split("human", args.num_human_pairs)]
    evals = [{"prompt": p, "reference": reference_summary(f, rng)} for rng, f,
             p in split("eval", args.num_eval)]
    return sft, human, evals


@cleans_up
def main(args):
    one_process_only("toy_tldr.py")
    check_args(args, positive=("num_sft", "num_human_pairs", "num_eval", "bt_temperature"))
    check_output(args.out_dir, "toy_tldr")
    sft, human, evals = make_world(args)
    output = start_output(args.out_dir, "toy_tldr")  # a hidden directory, renamed to out_dir when complete
    tmp = output.work
    write_jsonl(os.path.join(tmp, "sft.jsonl"), sft)
    write_jsonl(os.path.join(tmp, "prefs_human.jsonl"), human)
    write_jsonl(os.path.join(tmp, "eval.jsonl"), evals)
    build_tokenizer().save_pretrained(os.path.join(tmp, "tokenizer"))
    ref_score = sum(true_score(r["prompt"], r["completion"]) for r in sft) / len(sft)
    agree = sum(r["chosen_score"] > r["rejected_score"] for r in human) / len(human)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({**dataclasses.asdict(args), "vocab_size": len(vocabulary()),
                   "reference_true_score": ref_score, "human_label_agreement": agree}, f, indent=2)
    output.publish()
    print(f"wrote {args.out_dir}: {len(sft)} sft rows, {len(human)} human pairs, {len(evals)} eval prompts, "
          f"vocab {len(vocabulary())}; reference true score {ref_score:.2f}; "
          f"human labels agree with the true order on {agree:.1%} of pairs")


if __name__ == "__main__":
    main(parse_args(Args, __doc__))
