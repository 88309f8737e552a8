package fleet

import (
	"context"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// cpuMeter reports the processor time this process and redis-server spend
// per operation of a benchmark: what a decision costs the machine, which
// ns/op (wall time) does not say when the calls overlap.
type cpuMeter struct {
	redisPid    string
	self, redis time.Duration
}

func startCPU(b *testing.B, r *testutil.Redis) *cpuMeter {
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	info := c.Info(context.Background(), "server").Val()
	i := strings.Index(info, "process_id:")
	if i < 0 {
		b.Fatal("no process_id in INFO server")
	}
	pid, _, _ := strings.Cut(info[i+len("process_id:"):], "\r\n")
	m := &cpuMeter{redisPid: pid}
	m.self, m.redis = selfCPU(b), procCPU(b, pid)
	return m
}

func (m *cpuMeter) report(b *testing.B) {
	n := float64(b.N)
	b.ReportMetric(float64((selfCPU(b)-m.self).Microseconds())/n, "cpu-µs/op")
	b.ReportMetric(float64((procCPU(b, m.redisPid)-m.redis).Microseconds())/n, "redis-cpu-µs/op")
}

func selfCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// procCPU reads a process's user and system time from /proc (in clock
// ticks of 10 ms: meaningful over a benchmark's second, not per call).
func procCPU(b *testing.B, pid string) time.Duration {
	s, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(string(s[strings.LastIndexByte(string(s), ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}
