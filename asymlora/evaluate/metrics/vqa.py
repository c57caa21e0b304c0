"""VQA accuracy with the official VQA answer normalisation.

Implements the definition of the official VQA evaluation
(GT-Vision-Lab/VQA ``vqaEval.py``; the same code scores VQAv2 on EvalAI,
TextVQA and VizWiz):

1. newline / tab -> space, strip;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is
   *deleted* if it occurs next to a space in the answer, or if the answer
   contains a digit-comma-digit group anywhere ("1,000"); otherwise it is
   *replaced by a space*. A period is deleted unless a digit follows it
   ("3.5" stays, "dog." -> "dog"). Apostrophes and colons are kept;
3. lowercase, split on whitespace, number words ``none, zero .. ten`` ->
   digits, articles ``a an the`` dropped, contractions restored
   (``dont`` -> ``don't``), words re-joined with one space.

Accuracy of one answer against n annotator answers (n = 10 in the datasets):
for each annotator i, acc_i = min(#matches among the *other* n-1 answers / 3, 1);
the question's accuracy is the mean of the acc_i (the "ten 9-of-10 subsets").
So 2 matches out of 10 give (2 * 1/3 + 8 * 2/3) / 10 = 0.6, not 2/3.

Deliberate, documented choices where the official scripts differ between
versions: prediction and references are *both* always normalised (as the
M4C / LLaVA TextVQA evaluator does; VQAv2 references are already normalised
so this changes nothing there). With a single reference the leave-one-out
definition is undefined (always 0), so plain exact match is used instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from asymlora.evaluate.metrics._common import check_lengths, mean_percent

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\",
                "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official code passes re.UNICODE (== 32) as the `count` argument of
# re.sub, so at most 32 periods are stripped; kept for exact agreement.
_OFFICIAL_PERIOD_COUNT = 32

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
    "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# The official contraction table (apostrophe-less spelling -> canonical form).
# Entries are kept as the official table has them, including its oddities
# ("somebody'd" -> "somebodyd"); capitalised keys ("Im") can never match
# because words are lowercased first, exactly as in the official code.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def process_punctuation(text: str) -> str:
    """Official VQA punctuation step (see module docstring, rule 2)."""
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # The official test looks at the *input* text for every mark.
        if delete or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digits_articles(text: str) -> str:
    """Official VQA word step: lowercase, number words, articles, contractions."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Full official VQA answer normalisation (rules 1-3 of the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_articles(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one prediction: mean over leave-one-out subsets of
    min(#matching other answers / 3, 1), after normalising both sides."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    if len(refs) == 1:
        return 1.0 if refs[0] == pred else 0.0
    total_matches = sum(1 for r in refs if r == pred)
    accs = []
    for ref in refs:
        matches_in_others = total_matches - (1 if ref == pred else 0)
        accs.append(min(matches_in_others / 3.0, 1.0))
    return sum(accs) / len(accs)


def vqa_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
               answer_types: Sequence[str | None] | None = None) -> dict[str, float]:
    """VQAv2 / TextVQA accuracy in percent.

    Returns ``{"accuracy": overall}`` plus one key per answer type
    (``"yes/no"``, ``"number"``, ``"other"``) when ``answer_types`` is given,
    matching the official ``overall`` / ``perAnswerType`` report.
    """
    check_lengths(predictions=predictions, references=references)
    per_item = [vqa_accuracy(p, r) for p, r in zip(predictions, references)]
    result = {"accuracy": mean_percent(per_item)}
    if answer_types is not None:
        check_lengths(predictions=predictions, answer_types=answer_types)
        groups: dict[str, list[float]] = {}
        for acc, kind in zip(per_item, answer_types):
            if kind is not None:
                groups.setdefault(kind, []).append(acc)
        for kind in sorted(groups):
            result[kind] = mean_percent(groups[kind])
    return result
