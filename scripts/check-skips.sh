#!/usr/bin/env bash
# check-skips.sh LOG ALLOWLIST: fails when the `go test -v ./...` output in
# LOG holds a skipped test that ALLOWLIST does not name. CI runs with
# AETHERIUM_TEST_REQUIRE=1, under which a missing service or privilege fails
# instead of skipping; this catches every other skip (a bare t.Skip, a test
# that returns early and says so), so nothing goes untested silently.
#
# ALLOWLIST lines are "PACKAGE TEST  # reason": PACKAGE is the import path
# relative to the module (e.g. pkg/vmm/firecracker), TEST the full test name
# as go test prints it (subtests with '/'); '*' at the end of TEST matches
# any suffix. Every entry needs a reason.
set -euo pipefail
log=$1 allow=$2
module=$(go list -m)
bad=0
awk -v module="$module" '
  # go test -v prints each package block whole, ending with its ok/FAIL line.
  /^[[:space:]]*--- SKIP: / { sub(/^[[:space:]]*--- SKIP: /, ""); sub(/ \([0-9.]+s\)$/, ""); skips[n++] = $0; next }
  /^(ok|FAIL|---)[[:space:]]+[^[:space:]]+/ && ($1 == "ok" || $1 == "FAIL") {
    pkg = $2; sub("^" module "/?", "", pkg)
    for (i = 0; i < n; i++) print pkg, skips[i]
    n = 0
  }
' "$log" | sort -u | while read -r pkg test; do
  ok=0
  while read -r apkg atest _; do
    [ -z "$apkg" ] || [ "${apkg:0:1}" = "#" ] && continue
    [ "$apkg" = "$pkg" ] || continue
    case $atest in
      *'*') [[ $test == "${atest%\*}"* ]] && ok=1 ;;
      *) [ "$test" = "$atest" ] && ok=1 ;;
    esac
  done < "$allow"
  if [ "$ok" = 1 ]; then
    printf 'allowed skip: %s %s\n' "$pkg" "$test"
  else
    printf 'UNEXPECTED SKIP: %s %s (fix the test, or add it to %s with a reason)\n' "$pkg" "$test" "$allow"
    echo x >> "${log}.badskips"
  fi
done
if [ -s "${log}.badskips" ]; then
  rm -f "${log}.badskips"
  exit 1
fi
