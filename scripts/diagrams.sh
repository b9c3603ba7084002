#!/usr/bin/env bash
# Regenerate the SVG of every Graphviz source in diagrams/:
#
#   scripts/diagrams.sh        diagrams/X.dot -> diagrams/X.svg
#
# Needs `dot` (Debian: apt-get install graphviz). Commit the .dot and the .svg
# together; README.md and docs/operator-guide.md link the SVG.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
readonly DIR="${REPO}/diagrams"

case "${1:-}" in
"") ;;
-h | --help)
	sed -n '2,7s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
	exit 0
	;;
*)
	printf 'diagrams: unknown argument: %s\n' "$1" >&2
	exit 2
	;;
esac

if ! command -v dot >/dev/null; then
	printf 'diagrams: "dot" not found; install Graphviz: apt-get install graphviz\n' >&2
	exit 1
fi

shopt -s nullglob
sources=("${DIR}"/*.dot)
if ((${#sources[@]} == 0)); then
	printf 'diagrams: no .dot files in %s\n' "${DIR}" >&2
	exit 1
fi

for src in "${sources[@]}"; do
	svg="${src%.dot}.svg"
	# Render next to the target and rename, so a failed run keeps the old SVG.
	tmp="$(mktemp "${svg}.XXXXXX")"
	if ! dot -Tsvg "${src}" -o "${tmp}"; then
		rm -f "${tmp}"
		printf 'diagrams: dot failed on %s\n' "${src#"${REPO}"/}" >&2
		exit 1
	fi
	chmod 0644 "${tmp}"
	mv -f "${tmp}" "${svg}"
	printf 'diagrams: wrote %s\n' "${svg#"${REPO}"/}"
done
