# peerbuild's session driver: runs inside the build's shell (bash or POSIX sh) and takes
# requests on standard input: a header line "KIND N" followed by the N lines of one command.
#   run: the command runs in this shell, so cd and export persist (buildspec 0.2);
#   sub: the command runs in a subshell (buildspec 0.1);
#   cap: the command runs in a subshell and its standard output is captured.
# Replies go to file descriptor 3, which commands never see: "STATUS\n" for run and sub,
# "OUTPUT\0STATUS\n" for cap (shell variables cannot hold NUL, so NUL is a safe separator).
__pb_flags=
while IFS= read -r __pb_head; do
  __pb_n=${__pb_head#* }
  __pb_cmd=
  while [ "$__pb_n" -gt 0 ]; do
    IFS= read -r __pb_line || exit 97
    __pb_cmd="$__pb_cmd$__pb_line
"
    __pb_n=$((__pb_n - 1))
  done
  case $__pb_flags in *x*) set -x ;; esac
  case $__pb_head in
    run\ *)
      eval "$__pb_cmd" </dev/null 3>&-
      { __pb_rc=$?; __pb_flags=$-; set +x; } 2>/dev/null
      printf '%s\n' "$__pb_rc" >&3 ;;
    sub\ *)
      (eval "$__pb_cmd") </dev/null 3>&-
      { __pb_rc=$?; __pb_flags=$-; set +x; } 2>/dev/null
      printf '%s\n' "$__pb_rc" >&3 ;;
    cap\ *)
      __pb_out=$(eval "$__pb_cmd" </dev/null 3>&-)
      { __pb_rc=$?; __pb_flags=$-; set +x; } 2>/dev/null
      printf '%s\000%s\n' "$__pb_out" "$__pb_rc" >&3 ;;
    *) exit 98 ;;
  esac
done
