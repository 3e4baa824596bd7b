/* The `moe` program: subcommands over libmoe. */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--version")) {
        printf("moe %s\n", MOE_VERSION);
        return 0;
    }
    fprintf(stderr, "usage: moe --version\n");
    return 2;
}
