#include <stdio.h>
#include <string.h>
#include "greet.h"

static int failures;

static void expect(const char *name, const char *want) {
    char got[64];
    greet(got, sizeof got, name);
    if (strcmp(got, want) != 0) {
        printf("FAIL: greet(%s) = \"%s\", want \"%s\"\n", name ? name : "NULL", got, want);
        failures++;
    }
}

int main(void) {
    expect("ada", "hello, ada!");
    expect("", "hello, world!");
    expect(NULL, "hello, world!");
    printf("%s\n", failures ? "tests failed" : "all tests passed");
    return failures != 0;
}
