#include <stdio.h>
#include "greet.h"

int main(int argc, char **argv) {
    char line[256];
    greet(line, sizeof line, argc > 1 ? argv[1] : NULL);
    puts(line);
    return 0;
}
