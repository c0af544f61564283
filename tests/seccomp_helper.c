/* Installs a seccomp filter under which io_uring_setup(2) fails with errno
 * argv[1], then execs argv[2:]. Filters are inherited and cannot be removed,
 * so everything the child runs (Python, liburing) sees io_uring refused, the
 * way it is in default Docker profiles and on hardened kernels.
 *
 * Exit 77 with "SECCOMP-UNAVAILABLE ..." on stderr: no filter could be
 * installed here (the test skips). Built and run by test_io_uring_refused.py.
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define ARCH AUDIT_ARCH_AARCH64
#else
#error "unsupported architecture"
#endif

int main(int argc, char** argv) {
  if (argc < 3) return 2;
  const unsigned err = (unsigned)atoi(argv[1]);
  struct sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (err & SECCOMP_RET_DATA)),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  struct sock_fprog prog = {sizeof(filter) / sizeof(filter[0]), filter};
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
    fprintf(stderr, "SECCOMP-UNAVAILABLE prctl(PR_SET_NO_NEW_PRIVS): %s\n", strerror(errno));
    return 77;
  }
  if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) != 0) {
    fprintf(stderr, "SECCOMP-UNAVAILABLE prctl(PR_SET_SECCOMP): %s\n", strerror(errno));
    return 77;
  }
  /* The filter works: io_uring_setup itself must now fail with `err`. */
  long rc = syscall(__NR_io_uring_setup, 4, NULL);
  if (rc != -1 || errno != (int)err) {
    fprintf(stderr, "SECCOMP-UNAVAILABLE filter not effective (rc %ld, errno %d)\n", rc, errno);
    return 77;
  }
  execv(argv[2], argv + 2);
  fprintf(stderr, "execv %s: %s\n", argv[2], strerror(errno));
  return 127;
}
