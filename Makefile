# Makefile for the cqrs extension (PGXS)

EXTENSION = cqrs
MODULE_big = cqrs
OBJS = \
	src/cqrs.o \
	src/catalog.o \
	src/commands.o \
	src/guard.o \
	src/uuidv7.o \
	src/shmem.o \
	src/decoder.o \
	src/projector.o \
	src/projection.o \
	src/worker.o \
	src/admin.o \
	src/repair.o \
	src/spi.o \
	src/redis.o \
	src/redis_cluster.o \
	src/trace.o \
	src/otel.o
DATA = cqrs--0.1.0.sql cqrs--0.1.0--0.2.0.sql
PGFILEDESC = "cqrs - command log, projection and read model inside PostgreSQL"

PG_CPPFLAGS = -I$(srcdir)/src

# Redis write-through needs hiredis, found with pkg-config; WITH_HIREDIS=no
# builds without it (cqrs.status.redis then says "unavailable").
WITH_HIREDIS ?= $(shell pkg-config --exists hiredis 2>/dev/null && echo yes || echo no)
ifeq ($(WITH_HIREDIS),yes)
PG_CPPFLAGS += -DUSE_HIREDIS $(filter -I%,$(shell pkg-config --cflags hiredis))
SHLIB_LINK += $(shell pkg-config --libs hiredis)
endif
# Span export (OpenTelemetry, OTLP/HTTP) needs libcurl, found with
# pkg-config; WITH_CURL=no builds without it (spans are then only read
# with cqrs.spans()).
WITH_CURL ?= $(shell pkg-config --exists libcurl 2>/dev/null && echo yes || echo no)
ifeq ($(WITH_CURL),yes)
PG_CPPFLAGS += -DUSE_CURL $(filter -I%,$(shell pkg-config --cflags libcurl))
SHLIB_LINK += $(shell pkg-config --libs libcurl)
endif
# The warning set the code is kept clean under; CI adds -Werror.
PG_CFLAGS = -Wall -Wextra -Wno-unused-parameter $(CQRS_CFLAGS)

# pg_regress: SQL behaviour of the command path.
REGRESS = setup uuidv7 submit ship_cancel validation append_only privileges \
	search_path operate decoder domains projections
REGRESS_OPTS = --temp-config=$(srcdir)/test/cqrs.conf \
	--temp-instance=./tmp_check_regress --port=54391

# Isolation specs: every concurrency claim of the command path.
ISOLATION = duplicate_command_id sequence_assignment create_race bulk_escalation \
	define_while_submitting define_projection
ISOLATION_OPTS = --inputdir=$(srcdir)/test/isolation \
	--temp-config=$(srcdir)/test/cqrs.conf \
	--temp-instance=./tmp_check_iso --port=54392

# TAP: the projector, its crashes, restarts and leader changes.
TAP_TESTS = 1
PROVE_TESTS = test/t/*.pl

EXTRA_CLEAN = tmp_check tmp_check_regress tmp_check_iso results \
	regression.diffs regression.out output_iso tools/cqrs-load

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# Every module includes these; PGXS tracks no header dependencies itself.
$(OBJS): src/cqrs.h src/compat.h
src/redis.o src/redis_cluster.o: src/redis_cluster.h

# The load generator (libpq, hiredis when built with it, pthreads).
LOAD_CFLAGS = -O2 -Wall -Wextra -Wno-unused-parameter -pthread \
	-I$(shell $(PG_CONFIG) --includedir)
LOAD_LIBS = -L$(shell $(PG_CONFIG) --libdir) -lpq -lm
ifeq ($(WITH_HIREDIS),yes)
LOAD_CFLAGS += -DUSE_HIREDIS $(filter -I%,$(shell pkg-config --cflags hiredis))
LOAD_LIBS += $(shell pkg-config --libs hiredis)
endif

tools/cqrs-load: tools/cqrs-load.c src/redis_cluster.c src/redis_cluster.h
	$(CC) $(LOAD_CFLAGS) -I$(srcdir)/src $(CQRS_CFLAGS) -o $@ tools/cqrs-load.c \
		src/redis_cluster.c $(LOAD_LIBS)

cqrs-load: tools/cqrs-load

# The side-by-side benchmark suite: its own cluster and Redis, one table.
bench: tools/cqrs-load
	bash test/bench/suite.sh

.PHONY: cqrs-load bench
