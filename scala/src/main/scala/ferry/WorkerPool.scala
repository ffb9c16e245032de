package ferry

import java.io.{BufferedReader, File, InputStreamReader, RandomAccessFile}
import java.nio.charset.StandardCharsets
import java.nio.file.{Files, Path, Paths}
import java.nio.file.attribute.PosixFilePermissions
import java.security.SecureRandom
import java.util.concurrent.{CompletableFuture, ConcurrentHashMap, TimeUnit, TimeoutException}
import java.util.concurrent.atomic.AtomicInteger

import scala.collection.mutable
import scala.jdk.CollectionConverters._
import scala.util.control.NonFatal

import org.slf4j.LoggerFactory

/**
 * The ferry workers of this JVM, used alike on executors and on the driver.
 *
 * Locally (no `spark.ferry.worker.address`) a pool launches
 * `<spark.ferry.python> -m ferry worker --host 127.0.0.1 --port 0 --token-file T --port-file P`
 * processes, one per concurrently running task: [[WorkerPool.borrow]] hands out an idle worker or
 * starts a new one, [[WorkerPool.Lease.close]] gives it back. A worker found dead is replaced; all
 * workers are stopped when the JVM exits (SIGTERM, then SIGKILL after a grace period), and a worker
 * left idle for `spark.ferry.worker.idleTimeout` (default 10min; 0 = never) is stopped so that a
 * long-lived executor does not keep a Python process per core it once used. The token is
 * random per JVM and kept in a 0600 file; each worker's stderr goes to a log file whose tail is
 * quoted when it fails to start.
 *
 * With `spark.ferry.worker.address`, a pool hands out a client of that remote worker instead.
 */
final class WorkerPool private (val conf: FerryConf) {

  import WorkerPool._

  private val idle = mutable.ArrayDeque.empty[LocalWorker]
  private val all = ConcurrentHashMap.newKeySet[LocalWorker]()
  /** Workers being started in the background by [[prestart]], not yet claimed by a borrower. */
  private val starting = mutable.Queue.empty[CompletableFuture[LocalWorker]]
  @volatile private var stopped = false
  private lazy val remote: WorkerClient = {
    val token = conf.workerToken.orElse(conf.workerTokenFile.map(readToken)).getOrElse {
      throw new AuthenticationException(s"${FerryConf.WorkerAddress} is set to ${conf.workerAddress.get} but no " +
        s"token is: set ${FerryConf.WorkerToken} or ${FerryConf.WorkerTokenFile} to the remote worker's token.")
    }
    WorkerClient.connect(conf.workerAddress.get, token, conf)
  }

  /** A worker for the caller's exclusive use until the lease is closed. */
  def borrow(): Lease = {
    if (stopped) throw new WorkerUnavailableException("The ferry worker pool was stopped (the JVM is exiting).")
    if (conf.isRemote) return new Lease(this, remote, None)
    var found: LocalWorker = null
    while (found == null) {
      val (candidate, claimed) = synchronized {
        if (idle.nonEmpty) (idle.removeLast(), null)
        else if (starting.nonEmpty) (null, starting.dequeue())
        else (null, null)
      }
      if (claimed != null) {
        // A worker already on its way: wait for it rather than start yet another one.
        found = try claimed.join() catch { case NonFatal(_) => null }
      } else if (candidate == null) found = launch()
      else if (candidate.isAlive) found = candidate
      else {
        log.warn(s"ferry worker ${candidate.describe} died (exit code ${candidate.exitCode}); starting a new one. " +
          s"Its log: ${candidate.logFile}")
        discard(candidate)
      }
    }
    new Lease(this, found.client, Some(found))
  }

  /**
   * Starts local workers in the background until the pool has `count` (idle, lent out or
   * starting), so that tasks about to run find them ready. A no-op for a remote worker.
   */
  def prestart(count: Int): Unit = if (!conf.isRemote && !stopped) synchronized {
    val missing = count - all.size - starting.size
    (0 until missing).foreach { _ =>
      val f = new CompletableFuture[LocalWorker]()
      starting.enqueue(f)
      val t = new Thread(() => {
        try {
          val w = launch()
          synchronized {
            // Nobody claimed it yet: it becomes idle (a later claimer finds it there instead).
            if (starting.contains(f)) {
              starting -= f
              makeIdle(w)
            }
          }
          f.complete(w)
        } catch {
          case t: Throwable =>
            synchronized(starting -= f)
            log.warn(s"could not prestart a ferry worker: ${t.getMessage}")
            f.completeExceptionally(t)
        }
      }, "ferry-worker-prestart")
      t.setDaemon(true)
      t.start()
    }
  }

  /** Runs `f` with a borrowed worker; a worker that became unavailable is discarded, not returned. */
  def withClient[T](f: WorkerClient => T): T = {
    val lease = borrow()
    try f(lease.client)
    catch {
      case e: WorkerUnavailableException =>
        lease.markBroken()
        throw e
    } finally lease.close()
  }

  private def giveBack(worker: LocalWorker, broken: Boolean): Unit = {
    if (broken || stopped || !worker.isAlive) discard(worker)
    else makeIdle(worker)
  }

  private def makeIdle(worker: LocalWorker): Unit = {
    worker.idleSince = System.nanoTime()
    synchronized(idle.append(worker))
    reaper // started with the first idle worker
    reaperStarted = true
  }

  // Lets stop() shut the reaper down without starting one (touching the lazy val would).
  @volatile private var reaperStarted = false

  /** Stops the workers idle for longer than the timeout; borrowers take the most recent first. */
  private lazy val reaper: Option[java.util.concurrent.ScheduledExecutorService] =
    Option(conf.workerIdleTimeoutMs).filter(_ > 0).map { timeout =>
      val ex = java.util.concurrent.Executors.newSingleThreadScheduledExecutor { r =>
        val t = new Thread(r, "ferry-worker-reaper")
        t.setDaemon(true)
        t
      }
      val period = math.max(100L, math.min(timeout / 2, 30000L))
      ex.scheduleWithFixedDelay(() => {
        val now = System.nanoTime()
        val expired = synchronized {
          val old = idle.filter(w => (now - w.idleSince) / 1000000L >= timeout).toList
          idle.filterInPlace(w => !old.contains(w))
          old
        }
        expired.foreach { w =>
          log.info(s"stopping ferry worker ${w.describe}: idle for more than ${timeout / 1000.0}s " +
            s"(${FerryConf.WorkerIdleTimeout})")
          discard(w)
        }
      }, period, period, TimeUnit.MILLISECONDS)
      ex
    }

  private def discard(worker: LocalWorker): Unit = {
    all.remove(worker)
    worker.stop(graceMs = 2000)
  }

  /** Live local worker processes (idle or lent out). */
  def size: Int = all.size

  /** Idle local worker processes. */
  def idleCount: Int = synchronized(idle.size)

  /** The OS process ids of the live local workers (for tests and diagnostics). */
  def pids: Seq[Long] = all.asScala.toSeq.map(_.process.pid())

  /** Stops every worker of this pool (also done on JVM exit). */
  def stop(): Unit = {
    stopped = true
    if (reaperStarted) reaper.foreach(_.shutdownNow())
    val ws = all.asScala.toSeq
    all.clear()
    synchronized(idle.clear())
    stopAll(ws)
    if (conf.isRemote) {
      try remote.close()
      catch { case NonFatal(_) => }
    }
  }

  private val counter = new AtomicInteger()

  private def launch(): LocalWorker = {
    val n = counter.incrementAndGet()
    val dir = workDir
    val portFile = dir.resolve(s"worker-${ProcessHandle.current().pid()}-$n.port")
    val logDir = conf.workerLogDir.map(d => Files.createDirectories(Paths.get(d))).getOrElse(dir)
    val logFile = logDir.resolve(s"worker-${ProcessHandle.current().pid()}-$n.log")
    val cmd = Seq(conf.python, "-m", "ferry", "worker", "--host", "127.0.0.1", "--port", "0",
      "--token-file", tokenFile.toString, "--port-file", portFile.toString, "--exit-with-parent",
      "--max-message-bytes", conf.grpcMaxMessageBytes.toString) ++
      (if (conf.workerStages.nonEmpty) Seq("--stages", conf.workerStages.mkString(",")) else Nil)
    val pb = new ProcessBuilder(cmd.asJava)
    pb.redirectError(ProcessBuilder.Redirect.appendTo(logFile.toFile))
    pb.redirectInput(ProcessBuilder.Redirect.from(new File("/dev/null")))
    val env = pb.environment()
    env.put("PYTHONUNBUFFERED", "1")
    if (conf.workerPythonPath.nonEmpty) {
      val old = Option(env.get("PYTHONPATH")).filter(_.nonEmpty).toSeq
      env.put("PYTHONPATH", (conf.workerPythonPath ++ old).mkString(File.pathSeparator))
    }
    val started = System.nanoTime()
    val process =
      try pb.start()
      catch {
        case e: java.io.IOException =>
          throw new WorkerUnavailableException(s"Cannot start the ferry worker: '${conf.python}' could not be run " +
            s"(${e.getMessage}). Set ${FerryConf.Python} to a Python interpreter that has ferry installed " +
            "(pip install spark-ferry), e.g. a venv's bin/python.", e)
      }
    // Whatever goes wrong from here on, the process must not outlive this method unregistered.
    try {
      val port = new CompletableFuture[Int]()
      val reader = new Thread(() => {
        val in = new BufferedReader(new InputStreamReader(process.getInputStream, StandardCharsets.UTF_8))
        try {
          var line = in.readLine()
          while (line != null) {
            if (!port.isDone && line.startsWith(PortLinePrefix)) {
              try port.complete(line.substring(PortLinePrefix.length).trim.toInt)
              catch { case e: NumberFormatException => port.completeExceptionally(e) }
            } else log.info(s"ferry worker $n (pid ${process.pid()}): $line")
            line = in.readLine()
          }
        } catch { case NonFatal(_) => }
        finally port.completeExceptionally(new IllegalStateException("stdout closed"))
      }, s"ferry-worker-$n-stdout")
      reader.setDaemon(true)
      reader.start()

      def failure(what: String, cause: Throwable): WorkerUnavailableException = {
        val exit = if (process.isAlive) "still running, now stopped" else s"exit code ${process.exitValue()}"
        destroy(process, 2000)
        new WorkerUnavailableException(s"The ferry worker did not start: $what ($exit).\nCommand: ${cmd.mkString(" ")}\n" +
          s"Last lines of its stderr ($logFile):\n${tail(logFile.toFile, 40)}\n" +
          s"Check that ${FerryConf.Python}=${conf.python} has ferry and its dependencies installed" +
          (if (conf.workerStages.nonEmpty) s", and that the modules in ${FerryConf.WorkerStages} import " +
            s"(${FerryConf.WorkerPythonPath} adds to PYTHONPATH)" else "") + ".", cause)
      }

      val timeoutMs = conf.workerStartTimeoutMs
      try CompletableFuture.anyOf(port, process.onExit()).get(timeoutMs, TimeUnit.MILLISECONDS)
      catch {
        case _: TimeoutException =>
          throw failure(s"it did not print $PortLinePrefix<port> within ${timeoutMs / 1000.0}s " +
            s"(raise ${FerryConf.WorkerStartTimeout} if the machine is slow)", null)
        case NonFatal(_) =>
      }
      val p: Int =
        if (port.isDone && !port.isCompletedExceptionally) port.get()
        else {
          // The process exited (or closed stdout) before announcing a port.
          process.waitFor(2, TimeUnit.SECONDS)
          throw failure("it exited before it was serving", null)
        }
      val client = WorkerClient.connectLocal(p, token, conf)
      try client.checkHealth(math.min(conf.rpcTimeoutMs, 30000L))
      catch {
        case NonFatal(e) =>
          client.close()
          throw failure(s"it reported port $p but failed its health check: ${e.getMessage}", e)
      }
      try Files.deleteIfExists(portFile)
      catch { case NonFatal(_) => }
      val w = new LocalWorker(n, process, p, client, logFile)
      all.add(w)
      if (stopped) {
        discard(w)
        throw new WorkerUnavailableException("The ferry worker pool was stopped (the JVM is exiting).")
      }
      log.info(f"started ferry worker ${w.describe} in ${(System.nanoTime() - started) / 1e9}%.1fs; log: $logFile")
      w
    } catch {
      case t: Throwable =>
        destroy(process, 2000)
        throw t
    }
  }
}

object WorkerPool {

  private val log = LoggerFactory.getLogger(classOf[WorkerPool])
  private[ferry] val PortLinePrefix = "FERRY_WORKER_PORT="

  private val pools = new ConcurrentHashMap[FerryConf.PoolKey, WorkerPool]()

  /**
   * In local mode the tasks run in this JVM: start the workers they will borrow now (one per
   * partition, at most one per core), so that they come up while the driver's own queries run
   * (a planning pass, a metadata query) instead of after them.
   */
  private[ferry] def prestartLocal(spark: org.apache.spark.sql.SparkSession, conf: FerryConf, partitions: Int): Unit =
    if (spark.sparkContext.isLocal && partitions > 0) {
      get(conf).prestart(math.min(partitions, spark.sparkContext.defaultParallelism))
    }

  /** The pool of this JVM for `conf`'s worker settings (python, stages, address, ...). */
  def get(conf: FerryConf): WorkerPool = {
    hook
    pools.computeIfAbsent(conf.poolKey, _ => new WorkerPool(conf))
  }

  /** Stops every pool of this JVM. */
  def stopAll(): Unit = {
    val ps = pools.values().asScala.toSeq
    pools.clear()
    ps.foreach(p => try p.stop() catch { case NonFatal(_) => })
  }

  private lazy val hook: Unit = Runtime.getRuntime.addShutdownHook(new Thread(() => stopAll(), "ferry-worker-stop"))

  /** One private directory per JVM for the token and port files (0700), removed on exit. */
  private lazy val workDir: Path = {
    val d = Files.createTempDirectory("ferry-",
      PosixFilePermissions.asFileAttribute(PosixFilePermissions.fromString("rwx------")))
    d.toFile.deleteOnExit()
    d
  }

  /** A random bearer token for this JVM's local workers. */
  private lazy val token: String = {
    val bytes = new Array[Byte](32)
    new SecureRandom().nextBytes(bytes)
    bytes.map(b => f"${b & 0xff}%02x").mkString
  }

  private lazy val tokenFile: Path = {
    val f = Files.createTempFile(workDir, "token-", "",
      PosixFilePermissions.asFileAttribute(PosixFilePermissions.fromString("rw-------")))
    Files.write(f, token.getBytes(StandardCharsets.UTF_8))
    f.toFile.deleteOnExit()
    f
  }

  /** The bearer token of this JVM's local workers (for tests that call a worker directly). */
  private[ferry] def localToken: String = token

  private def readToken(path: String): String = {
    val t = new String(Files.readAllBytes(Paths.get(path)), StandardCharsets.UTF_8).trim
    if (t.isEmpty) throw new AuthenticationException(s"The token file $path (${FerryConf.WorkerTokenFile}) is empty.")
    t
  }

  private def stopAll(ws: Seq[LocalWorker]): Unit = {
    ws.foreach(w => try w.client.close() catch { case NonFatal(_) => })
    ws.foreach(_.process.destroy())
    val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(5)
    ws.foreach { w =>
      val left = deadline - System.nanoTime()
      if (left > 0) w.process.waitFor(left, TimeUnit.NANOSECONDS)
      if (w.process.isAlive) w.process.destroyForcibly()
    }
  }

  private def destroy(p: Process, graceMs: Long): Unit = {
    p.destroy()
    if (!p.waitFor(graceMs, TimeUnit.MILLISECONDS)) p.destroyForcibly()
  }

  /** The last `n` lines of a file (for error messages). */
  private[ferry] def tail(f: File, n: Int): String =
    try {
      val raf = new RandomAccessFile(f, "r")
      try {
        val len = raf.length()
        val start = math.max(0L, len - 64 * 1024)
        val buf = new Array[Byte]((len - start).toInt)
        raf.seek(start)
        raf.readFully(buf)
        val lines = new String(buf, StandardCharsets.UTF_8).split("\n")
        val t = lines.takeRight(n).mkString("\n")
        if (t.trim.isEmpty) "(empty)" else t
      } finally raf.close()
    } catch { case NonFatal(e) => s"(cannot read: $e)" }

  /** A worker process of this JVM. */
  private[ferry] final class LocalWorker(val n: Int, val process: Process, val port: Int, val client: WorkerClient,
      val logFile: Path) {
    def isAlive: Boolean = process.isAlive
    def exitCode: String = if (process.isAlive) "running" else process.exitValue().toString
    def describe: String = s"#$n (pid ${process.pid()}, port $port)"
    /** When it last became idle (System.nanoTime). */
    @volatile var idleSince: Long = System.nanoTime()
    def stop(graceMs: Long): Unit = {
      try client.close() catch { case NonFatal(_) => }
      destroy(process, graceMs)
    }
  }

  /**
   * A borrowed worker. Close it to give the worker back; [[markBroken]] first if the worker
   * misbehaved (it is then stopped instead of reused).
   */
  final class Lease private[WorkerPool] (pool: WorkerPool, val client: WorkerClient,
      private[ferry] val worker: Option[LocalWorker]) extends AutoCloseable {
    private var broken = false
    private var closed = false

    def markBroken(): Unit = broken = true

    /** The local worker's OS process id, if the worker is local. */
    def pid: Option[Long] = worker.map(_.process.pid())

    /** The local worker's stderr log, if the worker is local. */
    def logFile: Option[Path] = worker.map(_.logFile)

    override def close(): Unit = synchronized {
      if (!closed) {
        closed = true
        worker.foreach(w => pool.giveBack(w, broken))
      }
    }
  }
}
