# Small arithmetic helpers, tested by tests/run-tests.sh.
add() { echo $(( $1 + $2 )); }
mul() { echo $(( $1 * $2 )); }
max() { if [ "$1" -gt "$2" ]; then echo "$1"; else echo "$2"; fi; }
