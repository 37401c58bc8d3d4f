package guest

import (
	"fmt"
	"strconv"
	"strings"
)

// Linux x86-64 signal numbers. The table lives here rather than coming from
// x/sys/unix so the host can validate stop signals on any build platform.
var signalNumbers = map[string]int{
	"HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "IOT": 6,
	"BUS": 7, "FPE": 8, "KILL": 9, "USR1": 10, "SEGV": 11, "USR2": 12,
	"PIPE": 13, "ALRM": 14, "TERM": 15, "STKFLT": 16, "CHLD": 17, "CONT": 18,
	"STOP": 19, "TSTP": 20, "TTIN": 21, "TTOU": 22, "URG": 23, "XCPU": 24,
	"XFSZ": 25, "VTALRM": 26, "PROF": 27, "WINCH": 28, "IO": 29, "POLL": 29,
	"PWR": 30, "SYS": 31,
}

const (
	sigRTMIN = 34
	sigRTMAX = 64
)

// ParseSignal accepts "SIGTERM", "TERM", "15" or "SIGRTMIN+3" and returns
// the Linux signal number.
func ParseSignal(s string) (int, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n < 1 || n > sigRTMAX {
			return 0, fmt.Errorf("signal %d is outside 1..%d", n, sigRTMAX)
		}
		return n, nil
	}
	name := strings.TrimPrefix(strings.ToUpper(s), "SIG")
	if n, ok := signalNumbers[name]; ok {
		return n, nil
	}
	if rest, ok := strings.CutPrefix(name, "RTMIN"); ok {
		off := 0
		if rest != "" {
			o, err := strconv.Atoi(strings.TrimPrefix(rest, "+"))
			if err != nil || !strings.HasPrefix(rest, "+") {
				return 0, fmt.Errorf("unknown signal %q", s)
			}
			off = o
		}
		if n := sigRTMIN + off; n <= sigRTMAX {
			return n, nil
		}
	}
	if rest, ok := strings.CutPrefix(name, "RTMAX"); ok {
		off := 0
		if rest != "" {
			o, err := strconv.Atoi(strings.TrimPrefix(rest, "-"))
			if err != nil || !strings.HasPrefix(rest, "-") {
				return 0, fmt.Errorf("unknown signal %q", s)
			}
			off = o
		}
		if n := sigRTMAX - off; n >= sigRTMIN {
			return n, nil
		}
	}
	return 0, fmt.Errorf("unknown signal %q (use a name such as SIGTERM or a number)", s)
}
