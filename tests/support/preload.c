/* Test support for tests/security_e2e.rs: a library whose constructor
 * records where it ran. A derivation sets it as its LD_PRELOAD; if any
 * process on the host (outside the jail) ever loads it, a file appears in
 * $HATCH_PROBE_DIR naming the account and network namespace it ran in.
 * scripts/test builds it (cc -shared -fPIC) for the suites in a Nix root,
 * which has no compiler. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((constructor)) static void hatch_preload_probe(void)
{
    const char *dir = getenv("HATCH_PROBE_DIR");
    char path[4096], ns[256] = "?";
    if (dir == NULL)
        return;
    ssize_t n = readlink("/proc/self/ns/net", ns, sizeof ns - 1);
    if (n > 0)
        ns[n] = '\0';
    snprintf(path, sizeof path, "%s/ran-%d", dir, (int)getpid());
    FILE *f = fopen(path, "w");
    if (f == NULL)
        return;
    fprintf(f, "uid=%d netns=%s\n", (int)getuid(), ns);
    fclose(f);
}
