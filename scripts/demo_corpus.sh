#!/usr/bin/env bash
# Builds the text corpus of the demo model (models/demo) from Debian's `bible-kjv` package:
# the King James Bible, one verse a line, verse references stripped, split by book into
#   train.txt  every book not named below
#   valid.txt  Esther, Lamentations, Titus, Philemon      (checkpoint selection during training)
#   test.txt   Ruth, Jonah, James, 1-2 Peter, 1-3 John, Jude   (held out; reported perplexity)
# Books are separated by an empty line in each file.
#
# usage: scripts/demo_corpus.sh OUT_DIR        (needs `apt-get install -y bible-kjv`)
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
command -v bible >/dev/null || { echo "bible not found: apt-get install -y bible-kjv" >&2; exit 1; }
mkdir -p "$out"
bible -f Gen1:1-Rev22:21 >"$out/kjv_raw.txt"
# Every line is `<Book><chapter>:<verse> <text>`, e.g. `1Pet3:15 But sanctify ...`.
awk -v out="$out" '
BEGIN {
  split("Est Lam Titus Phmn", v, " ");                          for (i in v) valid[v[i]] = 1
  split("Ruth Jonah Jas 1Pet 2Pet 1Jn 2Jn 3Jn Jude", t, " ");   for (i in t) test[t[i]] = 1
}
{
  if (!match($0, /^[0-9]?[A-Za-z]+[0-9]+:[0-9]+ /)) { print "unparsed line " NR ": " $0 > "/dev/stderr"; exit 1 }
  ref = substr($0, 1, RLENGTH - 1); text = substr($0, RLENGTH + 1)
  book = ref; sub(/[0-9]+:[0-9]+$/, "", book)
  f = (book in test) ? out "/test.txt" : (book in valid) ? out "/valid.txt" : out "/train.txt"
  if (book != last[f] && last[f] != "") print "" > f
  last[f] = book
  print text > f
}' "$out/kjv_raw.txt"
rm "$out/kjv_raw.txt"
wc -lc "$out"/train.txt "$out"/valid.txt "$out"/test.txt
