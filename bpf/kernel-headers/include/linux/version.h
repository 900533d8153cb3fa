/* rsttrace: bcc includes this; the kernel ignores the value for tracepoint programs since 5.0 and
 * bcc itself passes the running kernel's version at load time. Kept only so bcc's includes resolve. */
#define LINUX_VERSION_CODE 393216
#define KERNEL_VERSION(a,b,c) (((a) << 16) + ((b) << 8) + ((c) > 255 ? 255 : (c)))
