"""Every method reference in the code names a heading of docs/method.md.

The code cites the method document in one form: ``docs/method.md`` followed
by a list of sections and decisions, e.g. ``docs/method.md §2.2, D6`` or
``docs/method.md §7.3 and §8.1``; a list may wrap onto the next comment or
docstring line. These tests fail when a cited section or decision has no
heading in docs/method.md, and when a reference keeps an older form ("method
spec 2.2", "spec section 6", "Decision D6", a bare "D6" or "section 6").
"""

from __future__ import annotations

import bisect
import os
import re

from absl.testing import absltest
from absl.testing import parameterized

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "method.md")
SCANNED_DIRS = ("gdnsq_jax", "train", "bench", "configs", "tests")
SCANNED_SUFFIXES = (".py", ".sh", ".md")
THIS_FILE = os.path.abspath(__file__)

# A heading "## 2. Quantizers", "### 2.2 Activation quantizer" or
# "### D6. Placement of FP layers"; its label is "2", "2.2" or "D6".
_HEADING = re.compile(r"^#{2,4}[ \t]+(\d+(?:\.\d+)*|D\d+)\.?[ \t]", re.M)
_LABEL = r"(?:§\d+(?:\.\d+)*|\bD\d+)\b"
_LIST = rf"{_LABEL}(?:(?:\s*,\s*|\s+and\s+){_LABEL})*"
_REFERENCE = re.compile(rf"docs/method\.md\s+({_LIST})")
_LABELS = re.compile(_LABEL)
_RANGE = re.compile(r"\s*[-\u2013]\s*§?\d")  # right after a label
# Older forms, each with what to write instead.
_OLD_FORMS = (
    (re.compile(r"\bmethod spec\b", re.I), "'method spec'"),
    (re.compile(r"\bspec\b,?\s+(?:sections?\s+)?\d", re.I), "'spec N'"),
    (re.compile(r"\bDecisions?\s+D?\d+"), "'Decision Dn'"),
    (re.compile(r"\bsections?\s+\d", re.I), "'section N'"),
)
_FIX = ("cite the method as 'docs/method.md §N' or 'docs/method.md Dn' "
        "(e.g. 'docs/method.md §2.2, D6')")


class _Text:
  """A file's lines joined into one string, comment markers dropped.

  A reference list wraps across docstring and ``#`` comment lines, so each
  line enters without its indentation and leading ``#``; offsets map back to
  line numbers for the messages.
  """

  def __init__(self, source: str):
    parts, self._starts, offset = [], [], 0
    for line in source.splitlines():
      stripped = re.sub(r"^\s*(?:#+\s*)?", "", line)
      self._starts.append(offset)
      parts.append(stripped)
      offset += len(stripped) + 1
    self.text = " ".join(parts)

  def line(self, offset: int) -> int:
    return bisect.bisect_right(self._starts, offset)


def scan(source: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
  """Finds the references of ``source`` and the problems in it.

  Args:
    source: a file's text.

  Returns:
    ``(references, problems)``: ``(line, label)`` per cited section (``"2.2"``)
    or decision (``"D6"``), and ``(line, message)`` per reference in an older
    form, bare label or range.
  """
  text = _Text(source)
  references, problems, covered = [], [], []
  for match in _REFERENCE.finditer(text.text):
    covered.append(match.span(1))
    for label in _LABELS.finditer(match.group(1)):
      offset = match.start(1) + label.start()
      references.append((text.line(offset), label.group().lstrip("§")))
      if _RANGE.match(text.text, match.start(1) + label.end()):
        problems.append((text.line(offset), f"range after {label.group()!r}:"
                         " list each section"))
  for label in _LABELS.finditer(text.text):
    if not any(lo <= label.start() < hi for lo, hi in covered):
      problems.append((text.line(label.start()),
                       f"{label.group()!r} without 'docs/method.md' before "
                       "its list"))
  for pattern, name in _OLD_FORMS:
    for match in pattern.finditer(text.text):
      problems.append((text.line(match.start()),
                       f"old form {name}: {match.group()!r}"))
  return references, sorted(problems)


def doc_labels() -> list[str]:
  """The labels of docs/method.md's headings, in order."""
  with open(DOC, encoding="utf-8") as f:
    return _HEADING.findall(f.read())


def scanned_files() -> list[str]:
  """The code and docs files whose references must resolve (sorted)."""
  paths = []
  for directory in SCANNED_DIRS:
    for root, dirs, files in os.walk(os.path.join(ROOT, directory)):
      dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
      for name in files:
        path = os.path.join(root, name)
        if name.endswith(SCANNED_SUFFIXES) and path != THIS_FILE:
          paths.append(path)
  return sorted(paths)


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


class MethodDocTest(absltest.TestCase):

  def test_doc_numbers_sections_and_decisions_once(self):
    labels = doc_labels()
    duplicates = sorted({l for l in labels if labels.count(l) > 1})
    self.assertEmpty(duplicates, f"headings numbered twice: {duplicates}")
    top = [int(l) for l in labels if l.isdigit()]
    self.assertEqual(top, list(range(1, len(top) + 1)),
                     "top-level sections must be numbered 1, 2, ...")
    decisions = [int(l[1:]) for l in labels if l.startswith("D")]
    self.assertEqual(decisions, list(range(1, len(decisions) + 1)),
                     "decisions must be numbered D1, D2, ...")
    self.assertGreaterEqual(len(decisions), 17)
    for label in labels:
      if "." in label:
        self.assertIn(label.rsplit(".", 1)[0], labels,
                      f"subsection {label} has no parent section")

  def test_every_reference_in_the_code_has_a_heading(self):
    labels = set(doc_labels())
    dangling, count = [], 0
    for path in scanned_files():
      references, _ = scan(_read(path))
      count += len(references)
      dangling += [f"{os.path.relpath(path, ROOT)}:{line}: {label}"
                   for line, label in references if label not in labels]
    if dangling:
      self.fail("references to docs/method.md without a heading there:\n"
                + "\n".join(dangling))
    # The scan must see the code's references at all (a broken pattern
    # would pass vacuously).
    self.assertGreater(count, 50)

  def test_no_reference_in_an_older_form(self):
    problems = []
    for path in scanned_files():
      _, found = scan(_read(path))
      problems += [f"{os.path.relpath(path, ROOT)}:{line}: {message}"
                   for line, message in found]
    if problems:
      self.fail(f"{_FIX}:\n" + "\n".join(problems))

  def test_references_inside_the_doc_resolve(self):
    labels = set(doc_labels())
    text = _Text(_read(DOC)).text
    cited = {m.group().lstrip("§") for m in _LABELS.finditer(text)}
    self.assertEmpty(sorted(cited - labels))


class ScanTest(parameterized.TestCase):
  """The scanner itself, on made-up sources."""

  @parameterized.named_parameters(
      ("section_and_decision", '"""Placement (docs/method.md §5, D6)."""',
       ["5", "D6"]),
      ("subsections_and", "# docs/method.md §7.3 and §8.1.", ["7.3", "8.1"]),
      ("wrapped_comment", "# see docs/method.md §7.3,\n  # §8.1 and D16",
       ["7.3", "8.1", "D16"]),
      ("wrapped_docstring", "  from docs/method.md\n  §2.3 (soundness)",
       ["2.3"]),
      ("trailing_words", "docs/method.md §14 items 9-11", ["14"]),
  )
  def test_finds_references(self, source, expected):
    references, problems = scan(source)
    self.assertEqual([label for _, label in references], expected)
    self.assertEmpty(problems)

  @parameterized.named_parameters(
      ("method_spec", "# (method spec 2.2)"),
      ("spec_section", "# spec section 6: 10 bits"),
      ("spec_comma_section", '"""(method spec, section 4.3)"""'),
      ("decision", "# Decision D12"),
      ("bare_decision", "# activations use ste (D4)"),
      ("bare_section_sign", "# as in §6"),
      ("section_n", "# see section 8.3"),
      ("range", "# docs/method.md §8-9"),
  )
  def test_flags_problems(self, source):
    _, problems = scan(source)
    self.assertNotEmpty(problems)

  def test_a_missing_heading_is_dangling(self):
    references, _ = scan("# docs/method.md §99.1, D99")
    labels = set(doc_labels())
    self.assertEqual([l for _, l in references if l not in labels],
                     ["99.1", "D99"])

  def test_reports_the_line_of_a_problem(self):
    _, problems = scan("x = 1\ny = 2  # Decision D3\n")
    self.assertNotEmpty(problems)
    self.assertEqual({line for line, _ in problems}, {2})

  def test_spec_as_a_name_is_not_a_reference(self):
    _, problems = scan("for name, spec in layer.items():\n  specs[name] = spec")
    self.assertEmpty(problems)


if __name__ == "__main__":
  absltest.main()
