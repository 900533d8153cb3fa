/* rsttrace: minimal kernel type names for bcc's prelude (see ../../README.md). */
#define CONFIG_BPF_SYSCALL 1
