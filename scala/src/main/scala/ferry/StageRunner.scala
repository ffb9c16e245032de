package ferry

import scala.util.control.NonFatal

import com.google.protobuf.ByteString
import org.apache.arrow.memory.BufferAllocator
import org.apache.arrow.vector.types.pojo.Schema
import org.apache.spark.TaskContext
import org.apache.spark.sql.catalyst.InternalRow
import org.apache.spark.sql.types.StructType

/**
 * Streams one partition's rows through a pooled worker. Used by every stage wrapper on the
 * executors: borrow a worker, open Runs, convert rows to Arrow and back, and release everything
 * (stream, Arrow buffers, worker) when the output is exhausted, on failure, or when the task ends.
 */
private[ferry] final class StageRunner(conf: FerryConf, name: String) extends AutoCloseable {

  private val lease = WorkerPool.get(conf).borrow()
  private val allocator: BufferAllocator =
    try ArrowBatches.newAllocator(s"ferry-$name-${System.nanoTime()}", conf)
    catch {
      case NonFatal(e) =>
        lease.close()
        throw e
    }
  private var current: Option[AutoCloseable] = None
  private var closed = false

  Option(TaskContext.get()).foreach(_.addTaskCompletionListener[Unit](_ => close()))

  /**
   * Runs `stage` over `rows` (of `schema`) in one Run stream; `convert` turns each output batch
   * message into values using the stream's reader (rows must be copied out of the batch).
   */
  def stream[T](stage: String, paramsJson: String, schema: StructType, rows: Iterator[InternalRow],
      resources: Seq[Array[Byte]] = Nil)(convert: (ArrowBatches.Reader, ByteString) => Iterator[T]): Iterator[T] = {
    val writer = new ArrowBatches.Writer(schema, allocator, conf.batchMaxRows, conf.batchMaxBytes, stage)
    streamMessages(stage, paramsJson, writer.arrowSchema, writer.batches(rows), writer, resources)(convert)
  }

  /** The allocator of this runner's Arrow buffers, for callers that build their own batches. */
  def bufferAllocator: BufferAllocator = allocator

  /**
   * Runs `stage` over record-batch `messages` of `schema` in one Run stream; `input` (which
   * owns the buffers behind the messages) is closed with the stream. `resources` are uploaded to
   * the worker unless it has them already, and named in the Open by digest.
   */
  def streamMessages[T](stage: String, paramsJson: String, schema: Schema, messages: Iterator[ByteString],
      input: AutoCloseable, resources: Seq[Array[Byte]] = Nil)(
      convert: (ArrowBatches.Reader, ByteString) => Iterator[T]): Iterator[T] = {
    var run: RunStream = null
    var reader: ArrowBatches.Reader = null
    val owned = new AutoCloseable {
      override def close(): Unit = {
        if (run != null) run.close()
        if (reader != null) reader.close()
        input.close()
      }
    }
    current = Some(owned)
    try {
      val digests = resources.map(r => guard(lease.client.ensureResource(r)))
      run = guard(lease.client.run(stage, paramsJson, ArrowBatches.serializeSchema(schema), messages,
        conf.maxInFlight, digests))
      reader = new ArrowBatches.Reader(run.outputSchema, allocator, stage)
    } catch {
      case NonFatal(e) =>
        // A worker restarted since the upload (a remote one) lacks it: the next task uploads again.
        if (e.isInstanceOf[MissingResourceException]) lease.client.forgetResources()
        owned.close()
        current = None
        throw e
    }
    val out = new Iterator[Iterator[T]] {
      private var done = false
      def hasNext: Boolean = !done && {
        val more =
          try guard(run.hasNext)
          catch {
            case NonFatal(e) =>
              owned.close()
              current = None
              throw e
          }
        if (!more) {
          done = true
          owned.close()
          current = None
        }
        more
      }
      def next(): Iterator[T] = convert(reader, run.next())
    }
    out.flatten
  }

  /** `output`, then the runner closed (its worker returned) as soon as `output` is exhausted. */
  def closingAfter[T](output: Iterator[T]): Iterator[T] = output ++ new Iterator[T] {
    def hasNext: Boolean = { close(); false }
    def next(): T = throw new NoSuchElementException
  }

  private def guard[T](body: => T): T =
    try body
    catch {
      case e: WorkerUnavailableException =>
        lease.markBroken()
        throw e
      case e: ProtocolException =>
        lease.markBroken()
        throw e
    }

  override def close(): Unit = synchronized {
    if (!closed) {
      closed = true
      try current.foreach(_.close())
      finally {
        current = None
        try allocator.close()
        finally lease.close()
      }
    }
  }
}
