package ferry

import java.io.RandomAccessFile
import java.nio.{ByteBuffer, MappedByteBuffer}
import java.nio.channels.FileChannel
import java.nio.file.{Files, Path, Paths}
import java.nio.file.attribute.PosixFilePermissions
import java.util.UUID
import java.util.concurrent.atomic.AtomicBoolean

import scala.util.control.NonFatal

import com.google.protobuf.{ByteString, UnsafeByteOperations}

/**
 * Which parts of a shared file hold messages the reader has not copied out yet. Allocation
 * goes round the file: right after the newest live region, else from the start. The same rule
 * as the worker's `ferry.worker.shared_memory.Regions`.
 */
private[ferry] final class Regions(val size: Long) {
  import Regions.Live
  private var live = Vector.empty[Live]
  private var head = 0L

  def alloc(n: Long, owner: AnyRef, index: Long): Option[Long] = {
    if (n <= 0 || n > size) return None
    if (live.isEmpty) head = 0
    Seq(head, 0L).find { start =>
      val end = start + n
      end <= size && live.forall(r => end <= r.start || start >= r.end)
    }.map { start =>
      live :+= Live(start, start + n, owner, index)
      head = start + n
      start
    }
  }

  /** Frees `owner`'s regions with index below `below`. */
  def release(owner: AnyRef, below: Long = Long.MaxValue): Unit =
    live = live.filterNot(r => (r.owner eq owner) && r.index < below)

  def liveCount: Int = live.size
}

private object Regions {
  private final case class Live(start: Long, end: Long, owner: AnyRef, index: Long)
}

/**
 * The two files through which one [[WorkerClient]] and its worker on the same host exchange Run
 * batches instead of sending them over the socket (`SharedMemory` in worker.proto): the client
 * writes input messages into `input`, the worker output messages into `output`, and each side
 * copies a message out as soon as it arrives. One Run stream uses them at a time ([[tryAcquire]]).
 *
 * The files are unlinked as soon as the worker has opened them (or refused them), so nothing is
 * left under the directory once both processes exit; the two files of a JVM killed in between
 * are deleted by the next ferry JVM on the host ([[SharedFiles.sweepStale]]).
 */
private[ferry] final class SharedFiles private (val id: String, inputPath: Path, outputPath: Path,
    input: MappedByteBuffer, output: MappedByteBuffer, val bytes: Long) {

  val inputRegions = new Regions(bytes)
  private val busy = new AtomicBoolean(false)
  @volatile private var linked = true
  @volatile private var closed = false

  def tryAcquire(): Boolean = !closed && busy.compareAndSet(false, true)

  def release(): Unit = {
    busy.set(false)
    if (closed) unmapAll()
  }

  /** What Open offers: the paths the first time, then only the id. */
  def offer: ferry.proto.v1.SharedMemory = {
    val b = ferry.proto.v1.SharedMemory.newBuilder().setId(id)
    if (linked) {
      b.setInputPath(inputPath.toString).setInputBytes(bytes).setOutputPath(outputPath.toString).setOutputBytes(bytes)
    }
    b.build()
  }

  /** Removes the files' names; the mappings stay valid in both processes. */
  def unlink(): Unit = if (linked) {
    linked = false
    Files.deleteIfExists(inputPath)
    Files.deleteIfExists(outputPath)
  }

  def writeInput(offset: Long, message: ByteString): Unit = {
    val dup = input.duplicate()
    dup.position(offset.toInt)
    message.copyTo(dup)
  }

  def readOutput(offset: Long, length: Long): ByteString = {
    if (offset < 0 || length <= 0 || offset + length > bytes) {
      throw new ProtocolException(s"The worker placed an output batch at [$offset, ${offset + length}) of a " +
        s"$bytes-byte shared-memory file; the client and the worker disagree on the file.")
    }
    val data = new Array[Byte](length.toInt)
    val dup = output.duplicate()
    dup.position(offset.toInt)
    dup.get(data)
    UnsafeByteOperations.unsafeWrap(data)
  }

  /** Unlinks, and unmaps unless a stream is using the mappings (then the last [[release]] does). */
  def close(): Unit = {
    closed = true
    try unlink() catch { case NonFatal(_) => }
    if (busy.compareAndSet(false, true)) unmapAll()
  }

  private var unmapped = false

  private def unmapAll(): Unit = synchronized {
    if (!unmapped) {
      unmapped = true
      SharedFiles.unmap(input)
      SharedFiles.unmap(output)
    }
  }
}

private[ferry] object SharedFiles {

  /** The directory of shared memory on this host, if it has one ferry can write. */
  lazy val defaultDir: Option[Path] = Some(Paths.get("/dev/shm")).filter(d => Files.isDirectory(d) && Files.isWritable(d))

  private val ownerOnly = PosixFilePermissions.asFileAttribute(PosixFilePermissions.fromString("rw-------"))

  /** Two new files of `bytes` each under `dir`, mapped; None when they cannot be made (no room, no tmpfs). */
  def create(dir: Path, bytes: Long): Option[SharedFiles] = {
    // Once per directory; another thread's files made meanwhile are this live process's, never swept.
    if (swept.add(dir)) sweepStale(dir, System.currentTimeMillis())
    val id = UUID.randomUUID().toString
    val pid = ProcessHandle.current().pid()
    val paths = Seq("in", "out").map(s => dir.resolve(s"ferry-$pid-$id-$s"))
    try {
      val maps = paths.map { p =>
        Files.createFile(p, ownerOnly)
        val f = new RandomAccessFile(p.toFile, "rw")
        try {
          f.setLength(bytes)
          f.getChannel.map(FileChannel.MapMode.READ_WRITE, 0, bytes)
        } finally f.close()
      }
      Some(new SharedFiles(id, paths(0), paths(1), maps(0), maps(1), bytes))
    } catch {
      case NonFatal(_) =>
        paths.foreach(p => try Files.deleteIfExists(p) catch { case NonFatal(_) => })
        None
    }
  }

  private val swept = java.util.concurrent.ConcurrentHashMap.newKeySet[Path]()
  private val Name = """ferry-(\d+)-[0-9a-f-]{36}-(?:in|out)""".r
  /** A live client's files lose their names one round trip after they are made; older ones are debris. */
  private[ferry] val StaleAfterMs = 60000L

  /**
   * Deletes the files that a JVM killed between making them and its worker's answer left under
   * `dir` (their pages are memory until someone does): ferry's names, a process id that is not
   * running, and older than [[StaleAfterMs]]. Files of other users stay (the directory's sticky
   * bit keeps them); so does anything that cannot be read or removed. Returns the names deleted.
   */
  private[ferry] def sweepStale(dir: Path, nowMs: Long): Seq[String] = {
    val deleted = Seq.newBuilder[String]
    try {
      val entries = Files.list(dir)
      try entries.iterator().forEachRemaining { p =>
        p.getFileName.toString match {
          case name @ Name(pid) =>
            try {
              val old = nowMs - Files.getLastModifiedTime(p).toMillis > StaleAfterMs
              if (old && !ProcessHandle.of(pid.toLong).isPresent && Files.deleteIfExists(p)) deleted += name
            } catch { case NonFatal(_) => }
          case _ =>
        }
      } finally entries.close()
    } catch { case NonFatal(_) => }
    deleted.result()
  }

  /** Unmaps now rather than at some later GC (the pages of a tmpfs file are memory). */
  private def unmap(b: ByteBuffer): Unit = try {
    val f = Class.forName("sun.misc.Unsafe").getDeclaredField("theUnsafe")
    f.setAccessible(true)
    val unsafe = f.get(null)
    unsafe.getClass.getMethod("invokeCleaner", classOf[ByteBuffer]).invoke(unsafe, b)
  } catch { case NonFatal(_) => }
}
