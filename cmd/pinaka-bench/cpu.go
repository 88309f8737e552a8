package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"time"
)

// CPU accounting. Throughput on a shared machine moves with whatever else
// runs, but the processor time a proxy spends per gigabyte or per tunnel
// moves much less, so each workload also reports what it cost: the proxy's
// CPU (the -pid processes) and this process's own (the clients and the
// origins, which share the machine's cores with the proxy). The two
// together bound what any proxy could reach here: with C cores a workload
// cannot go faster than C divided by the sum.

// cpuSample is the processor time used so far by the proxy processes and
// by this process, read from /proc (user + system time).
type cpuSample struct {
	proxy, self time.Duration
	proxyOK     bool // every -pid was readable
	selfOK      bool
}

func (b *bench) sampleCPU() cpuSample {
	var s cpuSample
	s.self, s.selfOK = readCPU("/proc/self/stat")
	// The direct baseline has no proxy to charge, even with -pid given.
	if b.proxy == nil || len(b.cfg.pids) == 0 {
		return s
	}
	s.proxyOK = true
	for _, pid := range b.cfg.pids {
		d, ok := readCPU("/proc/" + strconv.Itoa(pid) + "/stat")
		s.proxy += d
		s.proxyOK = s.proxyOK && ok
	}
	return s
}

// chargeCPU records in res what the work done since from cost per unit:
// milliseconds of CPU per GB moved for throughput (work in MB), microseconds
// per operation for rates (work in operations). Both are CPU seconds per
// unit of work times 10^6.
func (b *bench) chargeCPU(res *Result, from cpuSample, work float64) {
	if work <= 0 {
		return
	}
	to := b.sampleCPU()
	per := func(d time.Duration) *float64 {
		v := d.Seconds() / work * 1e6
		return &v
	}
	if from.proxyOK && to.proxyOK {
		res.ProxyCPU = per(to.proxy - from.proxy)
	}
	if from.selfOK && to.selfOK {
		res.BenchCPU = per(to.self - from.self)
	}
	res.CPUUnit = cpuUnit(res.Unit)
}

func cpuUnit(unit string) string {
	switch unit {
	case "MB/s":
		return "ms/GB"
	case "tunnels/s":
		return "µs/tunnel"
	case "req/s":
		return "µs/request"
	case "datagrams/s":
		return "µs/datagram"
	}
	return ""
}

// userHZ is the unit of the times in /proc/PID/stat (USER_HZ, fixed at
// 100 by the Linux ABI whatever the kernel's own tick rate).
const userHZ = 100

// readCPU returns the user + system time of a process from its
// /proc/PID/stat, and false when it cannot be read (the process is gone, or
// this is not Linux).
func readCPU(path string) (time.Duration, bool) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	d, err := parseStatCPU(data)
	return d, err == nil
}

// parseStatCPU parses utime and stime (fields 14 and 15) of a
// /proc/PID/stat line. The command name (field 2) is in parentheses and may
// contain spaces and parentheses itself, so fields are counted from the
// last ')'.
func parseStatCPU(data []byte) (time.Duration, error) {
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, fmt.Errorf("parsing /proc stat: no command name in %q", shorten(string(data), 60))
	}
	f := bytes.Fields(data[i+1:])
	// f[0] is field 3 (state), so utime (14) is f[11] and stime (15) f[12].
	if len(f) < 13 {
		return 0, fmt.Errorf("parsing /proc stat: %d fields after the command name, want at least 13", len(f))
	}
	var ticks int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(string(s), 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("parsing /proc stat: bad CPU time %q", s)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}
