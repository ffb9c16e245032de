package ferry

import java.io.ByteArrayOutputStream
import java.nio.channels.Channels

import scala.jdk.CollectionConverters._

import com.google.protobuf.{ByteString, UnsafeByteOperations}
import org.apache.arrow.memory.{BufferAllocator, RootAllocator}
import org.apache.arrow.vector._
import org.apache.arrow.vector.complex.ListVector
import org.apache.arrow.vector.ipc.{ReadChannel, WriteChannel}
import org.apache.arrow.vector.ipc.message.MessageSerializer
import org.apache.arrow.vector.types.FloatingPointPrecision
import org.apache.arrow.vector.types.pojo.{ArrowType, Field, FieldType, Schema}
import org.apache.spark.sql.Row
import org.apache.spark.sql.catalyst.InternalRow
import org.apache.spark.sql.catalyst.expressions.{GenericInternalRow, GenericRow, UnsafeArrayData, UnsafeProjection, UnsafeRow}
import org.apache.spark.sql.catalyst.util.{ArrayData, GenericArrayData}
import org.apache.spark.sql.types._
import org.apache.spark.sql.vectorized.{ColumnVector, ColumnarBatch}
import org.apache.spark.unsafe.Platform
import org.apache.spark.unsafe.types.UTF8String

/**
 * Spark rows <-> Arrow IPC encapsulated messages, the only form in which data reaches a worker.
 *
 * Supported column types: boolean, byte, short, int, long, float, double, string, binary and
 * arrays of any of those (`array<double>`, `array<float>`, ...). Anything else fails with a
 * [[SchemaMismatchException]] naming the column.
 */
object ArrowBatches {

  /** The JVM-wide allocator ferry's Arrow buffers come from; each stream takes a child of it. */
  @volatile private var root: RootAllocator = _

  def rootAllocator(limit: Long): RootAllocator = synchronized {
    if (root == null) root = new RootAllocator(limit)
    root
  }

  /** The root allocator if one was created (for tests that assert nothing leaked). */
  def rootAllocatorIfCreated: Option[RootAllocator] = Option(root)

  /** A child allocator for one stream; closing it fails loudly if a buffer leaked. */
  def newAllocator(name: String, conf: FerryConf): BufferAllocator =
    rootAllocator(conf.arrowMaxAllocation).newChildAllocator(name, 0, conf.arrowMaxAllocation)

  // ---------------------------------------------------------------------------------------------
  // Schemas

  def toArrowSchema(schema: StructType, stage: String = ""): Schema =
    new Schema(schema.fields.toSeq.map(f => toArrowField(f.name, f.dataType, f.nullable, stage)).asJava)

  private def toArrowField(name: String, dt: DataType, nullable: Boolean, stage: String): Field = dt match {
    case ArrayType(elem, containsNull) =>
      val child = toArrowField("element", elem, containsNull, stage)
      new Field(name, new FieldType(nullable, ArrowType.List.INSTANCE, null), java.util.List.of(child))
    case _ =>
      new Field(name, new FieldType(nullable, toArrowType(name, dt, stage), null), java.util.List.of())
  }

  private def toArrowType(name: String, dt: DataType, stage: String): ArrowType = dt match {
    case BooleanType => ArrowType.Bool.INSTANCE
    case ByteType => new ArrowType.Int(8, true)
    case ShortType => new ArrowType.Int(16, true)
    case IntegerType => new ArrowType.Int(32, true)
    case LongType => new ArrowType.Int(64, true)
    case FloatType => new ArrowType.FloatingPoint(FloatingPointPrecision.SINGLE)
    case DoubleType => new ArrowType.FloatingPoint(FloatingPointPrecision.DOUBLE)
    case StringType => ArrowType.Utf8.INSTANCE
    case BinaryType => ArrowType.Binary.INSTANCE
    case other =>
      throw new SchemaMismatchException(stage,
        s"Column '$name' has type ${other.simpleString}, which ferry cannot send to Python. Supported: " +
          "boolean, tinyint, smallint, int, bigint, float, double, string, binary and arrays of those; " +
          s"cast '$name' to one of them or leave it out of the stage's input columns.")
  }

  def fromArrowSchema(schema: Schema, stage: String = ""): StructType =
    StructType(schema.getFields.asScala.map(f => StructField(f.getName, fromArrowField(f, stage), f.isNullable)).toSeq)

  private def fromArrowField(f: Field, stage: String): DataType = f.getType match {
    case _: ArrowType.List | _: ArrowType.LargeList =>
      val child = f.getChildren.get(0)
      ArrayType(fromArrowField(child, stage), child.isNullable)
    case ArrowType.Bool.INSTANCE => BooleanType
    case i: ArrowType.Int if i.getIsSigned && i.getBitWidth == 8 => ByteType
    case i: ArrowType.Int if i.getIsSigned && i.getBitWidth == 16 => ShortType
    case i: ArrowType.Int if i.getIsSigned && i.getBitWidth == 32 => IntegerType
    case i: ArrowType.Int if i.getIsSigned && i.getBitWidth == 64 => LongType
    case fp: ArrowType.FloatingPoint if fp.getPrecision == FloatingPointPrecision.SINGLE => FloatType
    case fp: ArrowType.FloatingPoint if fp.getPrecision == FloatingPointPrecision.DOUBLE => DoubleType
    case ArrowType.Utf8.INSTANCE | ArrowType.LargeUtf8.INSTANCE => StringType
    case ArrowType.Binary.INSTANCE | ArrowType.LargeBinary.INSTANCE => BinaryType
    case other =>
      throw new SchemaMismatchException(stage,
        s"The worker returned column '${f.getName}' of Arrow type $other, which ferry cannot turn into a " +
          "Spark column. Supported: bool, int8/16/32/64, float32/64, (large_)string, (large_)binary and " +
          "(large_)lists of those; make the stage return one of them.")
  }

  def serializeSchema(schema: Schema): ByteString = {
    val out = new ByteArrayOutputStream()
    MessageSerializer.serialize(new WriteChannel(Channels.newChannel(out)), schema)
    UnsafeByteOperations.unsafeWrap(out.toByteArray)
  }

  def deserializeSchema(bytes: ByteString): Schema =
    MessageSerializer.deserializeSchema(new ReadChannel(Channels.newChannel(bytes.newInput())))

  // ---------------------------------------------------------------------------------------------
  // Rows -> batches

  /**
   * Writes rows of `schema` into Arrow record batches of at most `maxRows` rows and at most
   * `maxBytes` bytes per serialized IPC message (a single row larger than that travels alone),
   * yielding each batch as one encapsulated message. The rows are read as they are consumed.
   */
  final class Writer(schema: StructType, allocator: BufferAllocator, maxRows: Int, maxBytes: Long, stage: String = "")
    extends AutoCloseable {

    val arrowSchema: Schema = toArrowSchema(schema, stage)
    private val root = VectorSchemaRoot.create(arrowSchema, allocator)
    private val writers: Array[FieldWriter] =
      root.getFieldVectors.asScala.zip(schema.fields).map { case (v, f) => FieldWriter(v, f.dataType) }.toArray
    private val bufferCount = root.getFieldVectors.asScala.map(v => countBuffers(v.getField)).sum
    /** Upper bound on everything in a message that is not proportional to the rows. */
    val fixedOverhead: Long = 512L + 64L * (bufferCount + schema.length) + 16L * bufferCount
    private var closed = false

    /** Serialized batches, lazily: each `next()` reads just enough rows for one batch. */
    def batches(rows: Iterator[InternalRow]): Iterator[ByteString] = new Iterator[ByteString] {
      def hasNext: Boolean = carried > 0 || rows.hasNext
      def next(): ByteString = {
        if (!hasNext) throw new NoSuchElementException("no more rows")
        nextBatch(rows)
      }
    }

    /** Number of rows in the last batch produced (for tests and metrics). */
    var lastBatchRows: Int = 0

    /** Bytes of one row when every column is fixed-width (the common numeric case), else -1. */
    private val fixedRowBytes: Long =
      if (writers.forall(_.isInstanceOf[Fixed])) writers.map(_.asInstanceOf[Fixed].rowBytes).sum else -1L
    /** With fixed-width rows, how many fit in one batch (at least one). */
    private val fixedRowsPerBatch: Int =
      if (fixedRowBytes < 0) maxRows
      else math.max(1L, math.min(maxRows.toLong, (maxBytes - fixedOverhead) / fixedRowBytes)).toInt
    if (fixedRowBytes >= 0) root.getFieldVectors.asScala.foreach { v =>
      v.setInitialCapacity(fixedRowsPerBatch)
      v.allocateNew()
    }

    private def nextBatch(rows: Iterator[InternalRow]): ByteString = {
      var n = 0
      if (fixedRowBytes >= 0) {
        // Fixed-width rows: the row cap already keeps the message under maxBytes.
        while (n < fixedRowsPerBatch && rows.hasNext) {
          val row = rows.next()
          var i = 0
          while (i < writers.length) { writers(i).write(row, i, n); i += 1 }
          n += 1
        }
        return flush(n)
      }
      // A row that did not fit into the previous batch is already in the vectors, at index 0.
      n = carried
      var bytes = fixedOverhead + carriedBytes
      carried = 0
      carriedBytes = 0L
      // A carried row alone may already fill the batch (a row over the bytes cap travels alone).
      var full = n > 0 && (n >= maxRows || bytes >= maxBytes)
      while (!full && rows.hasNext) {
        val row = rows.next()
        var rowBytes = 0L
        var i = 0
        while (i < writers.length) { rowBytes += writers(i).sizeOf(row, i); i += 1 }
        if (n > 0 && bytes + rowBytes > maxBytes) {
          // The batch is full: send it, then write this row as the first of the next one now,
          // while the row is valid (the iterator may reuse it), instead of copying it to keep.
          val message = flush(n)
          i = 0
          while (i < writers.length) { writers(i).write(row, i, 0); i += 1 }
          carried = 1
          carriedBytes = rowBytes
          return message
        }
        i = 0
        while (i < writers.length) { writers(i).write(row, i, n); i += 1 }
        n += 1
        bytes += rowBytes
        if (n >= maxRows || bytes >= maxBytes) full = true
      }
      flush(n)
    }

    /** Rows (0 or 1) written into the vectors for the next batch, and their bytes. */
    private var carried = 0
    private var carriedBytes = 0L

    override def close(): Unit = if (!closed) {
      closed = true
      root.close()
    }

    private def flush(n: Int): ByteString = {
      var i = 0
      while (i < writers.length) { writers(i).finish(n); i += 1 }
      lastBatchRows = n
      serializeAndReset(root, n)
    }

    /** Serializes rows that are all known up front into one or more batches (convenience). */
    def writeAll(rows: Iterator[InternalRow]): Seq[ByteString] = batches(rows).toVector
  }

  /**
   * The rows of a sequence of batches, one reused row view per batch (no copies). One flat
   * iterator instead of nested flatMaps: the writer downstream calls hasNext/next per row.
   */
  def rows(batches: Iterator[ColumnarBatch]): Iterator[InternalRow] = new BatchRows(batches)

  private final class BatchRows(batches: Iterator[ColumnarBatch]) extends Iterator[InternalRow] {
    private var batch: ColumnarBatch = _
    private var n = 0
    private var i = 0

    override def hasNext: Boolean = i < n || {
      while (i >= n && batches.hasNext) {
        batch = batches.next()
        n = batch.numRows()
        i = 0
      }
      i < n
    }

    override def next(): InternalRow = {
      if (!hasNext) throw new NoSuchElementException("no more rows")
      val row = batch.getRow(i)
      i += 1
      row
    }
  }

  /**
   * The first `rows` rows of `root`'s vectors as one record-batch message; the vectors are then
   * reset (capacity kept) for the next batch.
   */
  def serializeAndReset(root: VectorSchemaRoot, rows: Int): ByteString = {
    root.setRowCount(rows)
    val batch = new VectorUnloader(root).getRecordBatch
    // Sized for the body plus the flatbuffer header, so the message is written in one buffer
    // and handed to protobuf without the growing and the final copy of a plain stream.
    val out = new MessageBytes(batch.computeBodyLength() + 4096)
    try MessageSerializer.serialize(new WriteChannel(Channels.newChannel(out)), batch)
    finally batch.close()
    root.getFieldVectors.asScala.foreach(_.reset())
    out.toByteString
  }

  private final class MessageBytes(size: Long) extends ByteArrayOutputStream(math.min(size, Int.MaxValue - 8).toInt) {
    def toByteString: ByteString = UnsafeByteOperations.unsafeWrap(buf, 0, count)
  }

  private def countBuffers(f: Field): Int = {
    val own = f.getType match {
      case _: ArrowType.List | ArrowType.Utf8.INSTANCE | ArrowType.Binary.INSTANCE => 3
      case _ => 2
    }
    own + f.getChildren.asScala.map(countBuffers).sum
  }

  /** Writes one column; `sizeOf` bounds the bytes a row adds (value, offset, validity bit rounded up). */
  private abstract class FieldWriter {
    def sizeOf(row: SpecializedGettersLike, ordinal: Int): Long
    def write(row: SpecializedGettersLike, ordinal: Int, index: Int): Unit
    def finish(count: Int): Unit
  }

  private type SpecializedGettersLike = org.apache.spark.sql.catalyst.expressions.SpecializedGetters

  private object FieldWriter {
    def apply(vector: ValueVector, dt: DataType): FieldWriter = (vector, dt) match {
      case (v: BitVector, BooleanType) => new Fixed(v, 1)((r, o, i) => v.setSafe(i, if (r.getBoolean(o)) 1 else 0))
      case (v: TinyIntVector, ByteType) => new Fixed(v, 1)((r, o, i) => v.setSafe(i, r.getByte(o)))
      case (v: SmallIntVector, ShortType) => new Fixed(v, 2)((r, o, i) => v.setSafe(i, r.getShort(o)))
      case (v: IntVector, IntegerType) => new Fixed(v, 4)((r, o, i) => v.setSafe(i, r.getInt(o)))
      case (v: BigIntVector, LongType) => new Fixed(v, 8)((r, o, i) => v.setSafe(i, r.getLong(o)))
      case (v: Float4Vector, FloatType) => new Fixed(v, 4)((r, o, i) => v.setSafe(i, r.getFloat(o)))
      case (v: Float8Vector, DoubleType) => new Fixed(v, 8)((r, o, i) => v.setSafe(i, r.getDouble(o)))
      case (v: VarCharVector, StringType) => new Str(v)
      case (v: VarBinaryVector, BinaryType) => new Bin(v)
      case (v: ListVector, ArrayType(elem, _)) => new Lst(v, apply(v.getDataVector, elem))
      case _ => throw new IllegalStateException(s"No Arrow writer for ${vector.getClass.getSimpleName} / $dt")
    }
  }

  /** Copies one value from a row into a vector slot (a SAM type: no boxing of the ints). */
  private trait Setter {
    def set(row: SpecializedGettersLike, ordinal: Int, index: Int): Unit
  }

  /** Reads one value of a row or array as an external (Row) value. */
  private trait Getter {
    def get(from: SpecializedGettersLike, ordinal: Int): Any
  }

  private final class Fixed(v: FieldVector, width: Int)(setter: Setter) extends FieldWriter {
    /** Value bytes plus one validity byte: an upper bound on what a row adds. */
    val rowBytes: Long = width + 1L
    def sizeOf(row: SpecializedGettersLike, ordinal: Int): Long = rowBytes
    def write(row: SpecializedGettersLike, ordinal: Int, index: Int): Unit =
      if (row.isNullAt(ordinal)) v.setNull(index) else setter.set(row, ordinal, index)
    def finish(count: Int): Unit = v.setValueCount(count)
  }

  private final class Str(v: VarCharVector) extends FieldWriter {
    def sizeOf(row: SpecializedGettersLike, ordinal: Int): Long =
      if (row.isNullAt(ordinal)) 5 else 5L + row.getUTF8String(ordinal).numBytes()
    def write(row: SpecializedGettersLike, ordinal: Int, index: Int): Unit =
      if (row.isNullAt(ordinal)) v.setNull(index)
      else {
        val s = row.getUTF8String(ordinal)
        v.setSafe(index, s.getByteBuffer, s.getByteBuffer.position(), s.numBytes())
      }
    def finish(count: Int): Unit = v.setValueCount(count)
  }

  private final class Bin(v: VarBinaryVector) extends FieldWriter {
    // An UnsafeRow (what scans and shuffles hand over) is read in place: getBinary would copy
    // each value to a new array, twice per row (size, then value), and values here are often
    // megabytes (image tiles), so those copies were most of the writer's garbage.
    def sizeOf(row: SpecializedGettersLike, ordinal: Int): Long =
      if (row.isNullAt(ordinal)) 5
      else row match {
        case u: UnsafeRow => 5L + (u.getLong(ordinal) & 0xFFFFFFFFL)
        case _ => 5L + row.getBinary(ordinal).length
      }
    def write(row: SpecializedGettersLike, ordinal: Int, index: Int): Unit =
      if (row.isNullAt(ordinal)) v.setNull(index)
      else row match {
        case u: UnsafeRow if u.getBaseObject.isInstanceOf[Array[Byte]] =>
          val offsetAndSize = u.getLong(ordinal)
          val start = u.getBaseOffset - Platform.BYTE_ARRAY_OFFSET + (offsetAndSize >>> 32)
          v.setSafe(index, java.nio.ByteBuffer.wrap(u.getBaseObject.asInstanceOf[Array[Byte]]), start.toInt,
            offsetAndSize.toInt)
        case _ => v.setSafe(index, row.getBinary(ordinal))
      }
    def finish(count: Int): Unit = v.setValueCount(count)
  }

  private final class Lst(v: ListVector, elem: FieldWriter) extends FieldWriter {
    private var childCount = 0
    def sizeOf(row: SpecializedGettersLike, ordinal: Int): Long =
      if (row.isNullAt(ordinal)) 5
      else {
        val a = row.getArray(ordinal)
        var s = 5L
        var i = 0
        while (i < a.numElements()) { s += elem.sizeOf(a, i); i += 1 }
        s
      }
    def write(row: SpecializedGettersLike, ordinal: Int, index: Int): Unit =
      if (row.isNullAt(ordinal)) {
        // An empty list whose validity bit is then cleared: offsets stay consistent.
        v.startNewValue(index)
        v.endValue(index, 0)
        org.apache.arrow.vector.BitVectorHelper.unsetBit(v.getValidityBuffer, index)
      } else {
        val a = row.getArray(ordinal)
        v.startNewValue(index)
        var i = 0
        while (i < a.numElements()) { elem.write(a, i, childCount + i); i += 1 }
        childCount += a.numElements()
        v.endValue(index, a.numElements())
      }
    def finish(count: Int): Unit = {
      elem.finish(childCount)
      v.setValueCount(count)
      childCount = 0
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Batches -> rows

  /**
   * Reads record-batch messages of one output schema. Each [[load]] replaces the previous batch,
   * so rows taken from a [[ColumnarBatch]] must be copied if they outlive it ([[rows]] and
   * [[externalRows]] copy).
   */
  final class Reader(val arrowSchema: Schema, allocator: BufferAllocator, stage: String = "") extends AutoCloseable {
    def this(schemaMessage: ByteString, allocator: BufferAllocator, stage: String) =
      this(deserializeSchema(schemaMessage), allocator, stage)

    val sparkSchema: StructType = fromArrowSchema(arrowSchema, stage)
    private val root = VectorSchemaRoot.create(arrowSchema, allocator)
    private val loader = new VectorLoader(root)
    private lazy val toUnsafe = UnsafeProjection.create(sparkSchema)
    private val toExternal: Array[Getter] = sparkSchema.fields.map(f => externalGetter(f.dataType))
    private var closed = false

    /** Loads one message; the returned batch is valid until the next `load` or `close`. */
    def load(message: ByteString): ColumnarBatch = {
      val batch = MessageSerializer.deserializeRecordBatch(
        new ReadChannel(Channels.newChannel(message.newInput())), allocator)
      try loader.load(batch)
      finally batch.close()
      val cols: Array[ColumnVector] = root.getFieldVectors.asScala.map(FixedWidthColumn.of).toArray
      new ColumnarBatch(cols, root.getRowCount)
    }

    /** The rows of one message as copied `InternalRow`s (safe to keep). */
    def rows(message: ByteString): Iterator[InternalRow] = {
      val batch = load(message)
      val out = new Array[InternalRow](batch.numRows())
      val it = batch.rowIterator()
      var i = 0
      while (it.hasNext) { out(i) = toUnsafe(it.next()).copy(); i += 1 }
      out.iterator
    }

    /**
     * The rows of one message without copying: one reused row view over the Arrow vectors, valid
     * until the next `load` or `close`. Spark operators that keep rows copy them (the
     * `InternalRow` contract), and a scan projects each row as it is taken.
     */
    def batchRows(message: ByteString): Iterator[InternalRow] = ArrowBatches.rows(Iterator.single(load(message)))

    /** The rows of one message as external `Row`s (for `createDataFrame` / `mapPartitions`). */
    def externalRows(message: ByteString): Iterator[Row] = {
      val batch = load(message)
      val n = batch.numRows()
      val out = new Array[Row](n)
      var r = 0
      while (r < n) {
        val row = batch.getRow(r)
        val values = new Array[Any](toExternal.length)
        var c = 0
        while (c < values.length) {
          values(c) = if (row.isNullAt(c)) null else toExternal(c).get(row, c)
          c += 1
        }
        out(r) = new GenericRow(values)
        r += 1
      }
      out.iterator
    }

    override def close(): Unit = if (!closed) {
      closed = true
      root.close()
    }
  }

  private def externalGetter(dt: DataType): Getter = dt match {
    case BooleanType => (g, i) => g.getBoolean(i)
    case ByteType => (g, i) => g.getByte(i)
    case ShortType => (g, i) => g.getShort(i)
    case IntegerType => (g, i) => g.getInt(i)
    case LongType => (g, i) => g.getLong(i)
    case FloatType => (g, i) => g.getFloat(i)
    case DoubleType => (g, i) => g.getDouble(i)
    case StringType => (g, i) => g.getUTF8String(i).toString
    case BinaryType => (g, i) => g.getBinary(i)
    case ArrayType(elem, _) =>
      val get = externalGetter(elem)
      (g, i) => {
        val a = g.getArray(i)
        IndexedSeq.tabulate(a.numElements())(j => if (a.isNullAt(j)) null else get.get(a, j))
      }
    case other => throw new IllegalStateException(s"unsupported type $other")
  }

  // ---------------------------------------------------------------------------------------------
  // External rows -> internal rows (for Dataset.mapPartitions, where rows arrive as Row)

  /** A converter from external `Row`s of `schema` to `InternalRow`s the [[Writer]] accepts. */
  def internalConverter(schema: StructType): Row => InternalRow = {
    val convs = schema.fields.map(f => toInternal(f.dataType))
    (row: Row) => {
      val values = new Array[Any](convs.length)
      var i = 0
      while (i < convs.length) {
        values(i) = if (row.isNullAt(i)) null else convs(i)(row.get(i))
        i += 1
      }
      new GenericInternalRow(values)
    }
  }

  private def toInternal(dt: DataType): Any => Any = dt match {
    case StringType => v => UTF8String.fromString(v.asInstanceOf[String])
    case ArrayType(DoubleType, false) => v => UnsafeArrayData.fromPrimitiveArray(v.asInstanceOf[collection.Seq[Double]].toArray)
    case ArrayType(elem, _) =>
      val c = toInternal(elem)
      v => {
        val seq = v match {
          case s: collection.Seq[_] => s
          case a: Array[_] => a.toSeq
          case l: java.util.List[_] => l.asScala.toSeq
        }
        new GenericArrayData(seq.map(x => if (x == null) null else c(x)).toArray): ArrayData
      }
    case _ => v => v
  }
}
