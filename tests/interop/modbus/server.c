/*
 * A Modbus server built on libmodbus: an implementation independent of the agent's (pymodbus)
 * for the interop tests (tests/test_modbus_interop.py builds and runs it).
 *
 *   modbus-server tcp PORT MAPFILE [--unit N] [--strict] [--max-read N]
 *   modbus-server rtu DEVICE BAUD MAPFILE [--unit N] [--strict] [--max-read N]
 *
 * PORT 0 takes a free port. Once serving, one line goes to stdout: "ready PORT" or "ready DEVICE".
 *
 * MAPFILE, one value a line ("#" starts a comment):
 *   TABLE ADDRESS KIND VALUE
 *   TABLE: coil, discrete, holding, input; ADDRESS: zero-based, decimal or 0x hex;
 *   KIND: u16 (one register, 0..65535), i16, bit (coil/discrete, 0 or 1),
 *         f32 (IEEE-754 float32 in two registers, high word first), f32_cdab (low word first).
 *         VALUE is decimal text, parsed by C's strtof. libmodbus's own modbus_set_float_* helpers are
 *         not used: their byte order changed between 3.1.6 and 3.1.8 (libmodbus issues 611, 665).
 *
 * Reads (functions 1-4) and writes (5, 6, 15, 16) are answered by libmodbus's modbus_reply,
 * except:
 *   --strict       a read that spans an address not in MAPFILE gets exception 2 (illegal data
 *                  address), as a meter that only answers for the registers its manual lists;
 *   --max-read N   a read of more than N registers or bits gets exception 3 (illegal data value);
 *   --unit N       over TCP, requests for another unit id get exception 11 (gateway target failed
 *                  to respond), as a serial gateway answers; over RTU, libmodbus ignores them.
 */
#define _DEFAULT_SOURCE
#include <errno.h>
#include <modbus.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <unistd.h>

enum { COIL, DISCRETE, HOLDING, INPUT, TABLES };
static const char *TABLE_NAMES[TABLES] = {"coil", "discrete", "holding", "input"};

static unsigned char defined[TABLES][65536];
static int strict = 0, max_read = 0, unit = 1, over_tcp = 0;

static void die(const char *what) {
    fprintf(stderr, "modbus-server: %s\n", what);
    exit(2);
}

static long number(const char *text, const char *line) {
    char *end;
    long value = strtol(text, &end, 0);
    if (*text == '\0' || *end != '\0') {
        fprintf(stderr, "modbus-server: not a number: %s in: %s\n", text, line);
        exit(2);
    }
    return value;
}

static void load(const char *path, modbus_mapping_t *map) {
    FILE *f = fopen(path, "r");
    if (f == NULL) die("cannot open the map file");
    char line[256], table[16], kind[16], value[64];
    char address[32];
    while (fgets(line, sizeof line, f) != NULL) {
        char *hash = strchr(line, '#');
        if (hash != NULL) *hash = '\0';
        if (sscanf(line, "%15s %31s %15s %63s", table, address, kind, value) != 4) {
            if (sscanf(line, "%15s", table) == 1) {
                fprintf(stderr, "modbus-server: want TABLE ADDRESS KIND VALUE, got: %s", line);
                exit(2);
            }
            continue;
        }
        int t = 0;
        while (t < TABLES && strcmp(TABLE_NAMES[t], table) != 0) t++;
        if (t == TABLES) die("unknown table (coil, discrete, holding, input)");
        long at = number(address, line);
        int width = (strcmp(kind, "f32") == 0 || strcmp(kind, "f32_cdab") == 0) ? 2 : 1;
        if (at < 0 || at + width > 65536) die("address out of range");
        if (t == COIL || t == DISCRETE) {
            if (strcmp(kind, "bit") != 0) die("coils and discrete inputs take kind bit");
            uint8_t *bits = t == COIL ? map->tab_bits : map->tab_input_bits;
            bits[at] = number(value, line) ? 1 : 0;
        } else {
            uint16_t *regs = t == HOLDING ? map->tab_registers : map->tab_input_registers;
            if (strcmp(kind, "u16") == 0 || strcmp(kind, "i16") == 0) {
                long v = number(value, line);
                if (v < -32768 || v > 65535) die("u16/i16 value out of range");
                regs[at] = (uint16_t)(v & 0xFFFF);
            } else if (width == 2) {
                char *end;
                float v = strtof(value, &end);
                if (*end != '\0') die("f32 value is not a number");
                uint32_t bits;
                memcpy(&bits, &v, sizeof bits); /* the IEEE-754 pattern; registers are host-order words */
                uint16_t high = (uint16_t)(bits >> 16), low = (uint16_t)(bits & 0xFFFF);
                int high_first = strcmp(kind, "f32") == 0;
                regs[at] = high_first ? high : low;
                regs[at + 1] = high_first ? low : high;
            } else {
                die("unknown kind (u16, i16, f32, f32_cdab for registers)");
            }
        }
        for (int i = 0; i < width; i++) defined[t][at + i] = 1;
    }
    fclose(f);
}

/* The exception to answer instead of modbus_reply, or 0. */
static int refusal(modbus_t *ctx, const uint8_t *req) {
    int header = modbus_get_header_length(ctx);
    int function = req[header];
    if (over_tcp && req[header - 1] != unit) return MODBUS_EXCEPTION_GATEWAY_TARGET;
    if (function < 1 || function > 4) return 0;
    int table = function == 1 ? COIL : function == 2 ? DISCRETE : function == 3 ? HOLDING : INPUT;
    int address = (req[header + 1] << 8) | req[header + 2];
    int count = (req[header + 3] << 8) | req[header + 4];
    if (max_read > 0 && count > max_read) return MODBUS_EXCEPTION_ILLEGAL_DATA_VALUE;
    if (strict) {
        for (int a = address; a < address + count; a++) {
            if (a > 65535 || !defined[table][a]) return MODBUS_EXCEPTION_ILLEGAL_DATA_ADDRESS;
        }
    }
    return 0;
}

static void answer(modbus_t *ctx, const uint8_t *req, int length, modbus_mapping_t *map) {
    int code = refusal(ctx, req);
    if (code != 0) {
        modbus_reply_exception(ctx, req, code);
    } else {
        modbus_reply(ctx, req, length, map);
    }
}

static void serve_tcp(modbus_t *ctx, modbus_mapping_t *map) {
    int listener = modbus_tcp_listen(ctx, 8);
    if (listener < 0) die(modbus_strerror(errno));
    struct sockaddr_in bound;
    socklen_t size = sizeof bound;
    if (getsockname(listener, (struct sockaddr *)&bound, &size) != 0) die("getsockname failed");
    printf("ready %d\n", ntohs(bound.sin_port));
    fflush(stdout);
    fd_set open_fds;
    FD_ZERO(&open_fds);
    FD_SET(listener, &open_fds);
    int top = listener;
    uint8_t req[MODBUS_TCP_MAX_ADU_LENGTH];
    for (;;) {
        fd_set ready = open_fds;
        if (select(top + 1, &ready, NULL, NULL, NULL) < 0) {
            if (errno == EINTR) continue;
            die("select failed");
        }
        for (int fd = 0; fd <= top; fd++) {
            if (!FD_ISSET(fd, &ready)) continue;
            if (fd == listener) {
                int client = accept(listener, NULL, NULL);
                if (client < 0) continue;
                if (client >= FD_SETSIZE) {
                    close(client);
                    continue;
                }
                FD_SET(client, &open_fds);
                if (client > top) top = client;
                continue;
            }
            modbus_set_socket(ctx, fd);
            int length = modbus_receive(ctx, req);
            if (length > 0) {
                answer(ctx, req, length, map);
            } else if (length < 0) { /* closed, or not Modbus TCP: drop that client */
                close(fd);
                FD_CLR(fd, &open_fds);
            }
        }
    }
}

static void serve_rtu(modbus_t *ctx, const char *device, modbus_mapping_t *map) {
    modbus_set_slave(ctx, unit);
    if (modbus_connect(ctx) != 0) die(modbus_strerror(errno));
    printf("ready %s\n", device);
    fflush(stdout);
    uint8_t req[MODBUS_RTU_MAX_ADU_LENGTH];
    for (;;) {
        int length = modbus_receive(ctx, req);
        if (length > 0) {
            answer(ctx, req, length, map);
        } else if (length < 0) {
            if (errno == ECONNRESET || errno == EBADF || errno == EIO) die("the serial line closed");
            modbus_flush(ctx); /* a bad CRC or a frame for nobody: wait for the next one */
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s tcp PORT MAPFILE [options] | rtu DEVICE BAUD MAPFILE [options]\n", argv[0]);
        return 2;
    }
    over_tcp = strcmp(argv[1], "tcp") == 0;
    if (!over_tcp && (strcmp(argv[1], "rtu") != 0 || argc < 5)) die("first argument: tcp or rtu");
    int first_option = over_tcp ? 4 : 5;
    for (int i = first_option; i < argc; i++) {
        if (strcmp(argv[i], "--strict") == 0) {
            strict = 1;
        } else if (strcmp(argv[i], "--max-read") == 0 && i + 1 < argc) {
            max_read = (int)number(argv[++i], "--max-read");
        } else if (strcmp(argv[i], "--unit") == 0 && i + 1 < argc) {
            unit = (int)number(argv[++i], "--unit");
        } else {
            die("unknown option (--strict, --max-read N, --unit N)");
        }
    }
    modbus_mapping_t *map = modbus_mapping_new(65536, 65536, 65536, 65536);
    if (map == NULL) die("out of memory");
    load(over_tcp ? argv[3] : argv[4], map);
    modbus_t *ctx = over_tcp ? modbus_new_tcp("127.0.0.1", (int)number(argv[2], "PORT"))
                             : modbus_new_rtu(argv[2], (int)number(argv[3], "BAUD"), 'N', 8, 1);
    if (ctx == NULL) die(modbus_strerror(errno));
    if (over_tcp) {
        serve_tcp(ctx, map);
    } else {
        serve_rtu(ctx, argv[2], map);
    }
    return 0;
}
