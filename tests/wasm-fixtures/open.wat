;; `open.wasm read PATH` prints the file at PATH; `open.wasm write PATH` writes a line to it.
;; `open.wasm link TARGET PATH` makes PATH a symlink to TARGET.
;; Exits with the WASI errno when PATH cannot be opened (or made).
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
;; (path_symlink old_path old_len fd new_path new_len)
  (import "wasi_snapshot_preview1" "path_symlink" (func $path_symlink (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 64) "written by wasm\n")
  (func $strlen (param $p i32) (result i32) (local $n i32)
    (block $done (loop $next
      (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $next)))
    (local.get $n))
  (func $write (param $fd i32) (param $p i32) (param $len i32)
    (i32.store (i32.const 16) (local.get $p))
    (i32.store (i32.const 20) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 24))))
  (func (export "_start") (local $path i32) (local $writing i32) (local $errno i32) (local $fd i32) (local $n i32)
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $args_get (i32.const 1024) (i32.const 4096)))
    ;; argv[1] starts with `w`: write.
    (local.set $writing (i32.eq (i32.load8_u (i32.load (i32.const 1028))) (i32.const 119)))
    (local.set $path (i32.load (i32.const 1032)))
    ;; argv[1] starts with `l`: link argv[3] to argv[2].
    (if (i32.eq (i32.load8_u (i32.load (i32.const 1028))) (i32.const 108))
      (then
        (call $proc_exit (call $path_symlink
          (local.get $path) (call $strlen (local.get $path)) (i32.const 3)
          (i32.load (i32.const 1036)) (call $strlen (i32.load (i32.const 1036)))))))
    (local.set $errno (call $path_open
      (i32.const 3) (i32.const 1)
      (local.get $path) (call $strlen (local.get $path))
      (select (i32.const 9) (i32.const 0) (local.get $writing)) ;; O_CREAT | O_TRUNC
      (i64.const 0x1FFFFFFF) (i64.const 0x1FFFFFFF) (i32.const 0) (i32.const 8)))
    (if (local.get $errno) (then (call $proc_exit (local.get $errno))))
    (local.set $fd (i32.load (i32.const 8)))
    (if (local.get $writing)
      (then (call $write (local.get $fd) (i32.const 64) (i32.const 16)))
      (else
        (i32.store (i32.const 16) (i32.const 8192))
        (i32.store (i32.const 20) (i32.const 4096))
        (local.set $errno (call $fd_read (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 24)))
        (if (local.get $errno) (then (call $proc_exit (local.get $errno))))
        (call $write (i32.const 1) (i32.const 8192) (i32.load (i32.const 24)))))
    (call $proc_exit (i32.const 0))))
