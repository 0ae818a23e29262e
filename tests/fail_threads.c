/* LD_PRELOAD shim for the shell tests: makes thread creation fail, as it
 * does under a pids limit (EAGAIN), while the file named by
 * $FAIL_THREADS_FILE exists. The file holds N: every Nth call made while
 * it exists fails (1: all of them). Each failure appends a line to
 * $FAIL_THREADS_FILE.log, so a test can tell the shim did something. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

typedef int create_fn (pthread_t *, const pthread_attr_t *,
                       void *(*) (void *), void *);

int
pthread_create (pthread_t *thread, const pthread_attr_t *attr,
                void *(*start) (void *), void *arg)
{
  static create_fn *real;
  static unsigned long calls;
  const char *path = getenv ("FAIL_THREADS_FILE");
  FILE *f;
  long every;

  if (real == NULL)
    real = (create_fn *) dlsym (RTLD_NEXT, "pthread_create");
  if (path != NULL && (f = fopen (path, "r")) != NULL) {
    if (fscanf (f, "%ld", &every) != 1 || every < 1)
      every = 1;
    fclose (f);
    if (__atomic_add_fetch (&calls, 1, __ATOMIC_SEQ_CST) % every == 0) {
      char log[4096];
      snprintf (log, sizeof log, "%s.log", path);
      if ((f = fopen (log, "a")) != NULL) {
        fputs ("pthread_create failed\n", f);
        fclose (f);
      }
      return EAGAIN;
    }
  }
  return real (thread, attr, start, arg);
}
